//! Files bundled into the binaries so the demo runs with no network: the
//! real Qwen3 tokenizer (zstd-compressed) and the Qwen3 thinking chat
//! template.

/// zstd-compressed `tokenizer.json` of Qwen3 (151,643 tokens, 26 specials).
const TOKENIZER_ZST: &[u8] = include_bytes!("../../../fixtures/qwen3-tokenizer.json.zst");

/// The Qwen3 tokenizer's JSON.
pub fn qwen3_tokenizer_json() -> Vec<u8> {
    zstd::decode_all(TOKENIZER_ZST).expect("bundled tokenizer decompresses")
}

/// The chat template of Qwen3-Next-80B-A3B-Thinking (ChatML; the assistant
/// turn opens with `<think>`; earlier turns' reasoning is dropped).
pub const QWEN3_THINKING_CHAT_TEMPLATE: &str = r#"{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n<think>\n' }}
{%- endif %}
"#;

/// `tokenizer_config.json` for the Qwen3 tokenizer with `template`.
pub fn qwen3_tokenizer_config(template: &str) -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "model_max_length": 262144,
        "add_bos_token": false,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "errors": "replace",
        "split_special_tokens": false,
        "chat_template": template,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn bundled_tokenizer_is_qwen3() {
        let json = super::qwen3_tokenizer_json();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let vocab = v["model"]["vocab"].as_object().unwrap();
        assert_eq!(vocab.len(), 151_643);
        assert_eq!(v["added_tokens"].as_array().unwrap().len(), 26);
    }
}
