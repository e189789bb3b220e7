//! The model's `tokenizer.json` (through the `tokenizers` crate) and
//! incremental detokenization that streams only complete UTF-8 text.
//!
//! Loading: `tokenizers` reads a BPE model by buffering it through two
//! generic JSON trees (an untagged enum, then `serde_json::Value`) before
//! building it, which took ~0.45 s of CPU for Qwen3's 151k-token vocabulary
//! and most of an interactive chat's start-up. [`fast_bpe`] reads the same
//! file straight into the BPE builder's vocabulary and merges and builds the
//! same tokenizer (every other part is read by `tokenizers`' own types);
//! a file it does not understand goes through `Tokenizer::from_bytes`.

use serde::Deserialize;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::ModelWrapper;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, PaddingParams, Tokenizer, TokenizerBuilder, TruncationParams};

use super::ChatError;
use crate::weights::WeightSource;

/// A model's tokenizer plus the special ids chat needs.
pub struct ChatTokenizer {
    inner: Tokenizer,
    /// `<think>` when the vocabulary has it.
    pub think_start: Option<u32>,
    /// `</think>` (151668 in Qwen3) when the vocabulary has it.
    pub think_end: Option<u32>,
    /// `<|im_end|>` when the vocabulary has it.
    pub im_end: Option<u32>,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` from the model directory or cache; a clear
    /// error naming the directory when it is missing or broken.
    pub fn load(weights: &dyn WeightSource) -> Result<ChatTokenizer, ChatError> {
        let dir = weights.path();
        let bytes = weights
            .aux_file("tokenizer.json")
            .ok_or_else(|| ChatError::MissingTokenizer { dir: dir.clone() })?;
        Self::from_bytes(&bytes, &dir)
    }

    /// Parses a `tokenizer.json`; `dir` names it in messages.
    pub fn from_bytes(bytes: &[u8], dir: &str) -> Result<ChatTokenizer, ChatError> {
        let inner = match fast_bpe(bytes) {
            Some(t) => t,
            None => Tokenizer::from_bytes(bytes).map_err(|e| ChatError::BadTokenizer {
                dir: dir.to_string(),
                reason: e.to_string(),
            })?,
        };
        Ok(ChatTokenizer {
            think_start: inner.token_to_id("<think>"),
            think_end: inner.token_to_id("</think>"),
            im_end: inner.token_to_id("<|im_end|>"),
            inner,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (as chat
    /// templates do) become their ids; nothing is added around it, as
    /// transformers' `apply_chat_template(tokenize=True)` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ChatError::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ChatError::Tokenize(e.to_string()))
    }

    /// The id of a token string, e.g. `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of one token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// `tokenizer.json` with a BPE model, as [`fast_bpe`] reads it. Fields
/// are those `tokenizers` reads (it ignores unknown top-level keys too).
#[derive(Deserialize)]
struct BpeTokenizerFile {
    version: String,
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    added_tokens: Vec<AddedTokenWithId>,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    model: BpeModelFile,
}

#[derive(Deserialize)]
struct AddedTokenWithId {
    id: u32,
    #[serde(flatten)]
    token: AddedToken,
}

/// Only `"type": "BPE"` deserializes.
#[derive(Deserialize)]
enum BpeTag {
    #[serde(rename = "BPE")]
    Bpe,
}

/// The BPE model's fields. Unknown fields fail here and go to the general
/// reader.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BpeModelFile {
    #[serde(rename = "type")]
    _tag: BpeTag,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    vocab: Vocab,
    merges: Vec<Merge>,
}

/// One merge, as `["a", "b"]` or in the older `"a b"` form.
struct Merge(String, String);

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Merge, D::Error> {
        struct MergeVisitor;
        impl<'de> serde::de::Visitor<'de> for MergeVisitor {
            type Value = Merge;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a merge: [\"a\", \"b\"] or \"a b\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Merge, E> {
                // `tokenizers` skips "#version" lines and rejects any other
                // line without exactly one space; both go to its reader.
                match s.split_once(' ') {
                    Some((a, b)) if !b.contains(' ') && !s.starts_with("#version") => {
                        Ok(Merge(a.to_string(), b.to_string()))
                    }
                    _ => Err(E::custom("not a merge")),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Merge, A::Error> {
                let a: String = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::custom("empty merge"))?;
                let b: String = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::custom("short merge"))?;
                match seq.next_element::<serde::de::IgnoredAny>()? {
                    None => Ok(Merge(a, b)),
                    Some(_) => Err(serde::de::Error::custom("long merge")),
                }
            }
        }
        d.deserialize_any(MergeVisitor)
    }
}

/// Builds the tokenizer of a BPE `tokenizer.json` the way `tokenizers`'
/// own reader does (same builder calls, same order of added tokens), or
/// None when the file is not one this reader handles, including when an
/// added token would not get the id the file gives it.
fn fast_bpe(bytes: &[u8]) -> Option<Tokenizer> {
    let f: BpeTokenizerFile = serde_json::from_slice(bytes).ok()?;
    if f.version != "1.0" {
        return None;
    }
    let m = f.model;
    let merges = m.merges.into_iter().map(|Merge(a, b)| (a, b)).collect();
    let mut bpe = BPE::builder().vocab_and_merges(m.vocab, merges);
    if let Some(d) = m.dropout {
        bpe = bpe.dropout(d);
    }
    if let Some(u) = m.unk_token {
        bpe = bpe.unk_token(u);
    }
    if let Some(p) = m.continuing_subword_prefix {
        bpe = bpe.continuing_subword_prefix(p);
    }
    if let Some(s) = m.end_of_word_suffix {
        bpe = bpe.end_of_word_suffix(s);
    }
    if let Some(b) = m.fuse_unk {
        bpe = bpe.fuse_unk(b);
    }
    if let Some(b) = m.byte_fallback {
        bpe = bpe.byte_fallback(b);
    }
    if let Some(b) = m.ignore_merges {
        bpe = bpe.ignore_merges(b);
    }
    let mut tk = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(ModelWrapper::BPE(bpe.build().ok()?))
    .with_normalizer(f.normalizer)
    .with_pre_tokenizer(f.pre_tokenizer)
    .with_post_processor(f.post_processor)
    .with_decoder(f.decoder)
    .with_truncation(f.truncation)
    .with_padding(f.padding)
    .build()
    .ok()?;
    let tokens: Vec<AddedToken> = f.added_tokens.iter().map(|t| t.token.clone()).collect();
    tk.add_tokens(&tokens);
    let tk = Tokenizer::from(tk);
    // `tokenizers` only warns when an added token's id differs from the
    // file's; that tokenizer is left to the general reader.
    f.added_tokens
        .iter()
        .all(|t| tk.token_to_id(&t.token.content) == Some(t.id))
        .then_some(tk)
}

/// Turns a stream of token ids into a stream of text pieces, emitting text
/// only once it is complete UTF-8 (a multi-byte character split over
/// several byte-level tokens comes out whole, never as U+FFFD halves).
///
/// It decodes a short window of recent ids twice (before and after the new
/// id) and emits the difference, so tokenizers whose decoders depend on
/// context (SentencePiece's leading space) also stream correctly.
#[derive(Clone, Debug, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl Detokenizer {
    /// An empty stream.
    pub fn new() -> Detokenizer {
        Detokenizer::default()
    }

    /// Adds one id; returns the new complete text, if any.
    pub fn push(&mut self, tok: &ChatTokenizer, id: u32) -> Result<Option<String>, ChatError> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
            let new = after[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            // Keep the window short: drop ids no longer needed as context.
            if self.prefix > 64 {
                self.ids.drain(..self.prefix);
                self.read -= self.prefix;
                self.prefix = 0;
            }
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// Whatever is still held back at the end of the stream (an incomplete
    /// character comes out as U+FFFD, as a full decode would give).
    pub fn flush(&mut self, tok: &ChatTokenizer) -> Result<Option<String>, ChatError> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let after = tok.decode(&self.ids[self.prefix..])?;
        self.ids.clear();
        self.prefix = 0;
        self.read = 0;
        Ok(after
            .strip_prefix(before.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qwen() -> ChatTokenizer {
        ChatTokenizer::from_bytes(&crate::assets::qwen3_tokenizer_json(), "bundled").unwrap()
    }

    #[test]
    fn special_ids_and_round_trip() {
        let t = qwen();
        assert_eq!(t.think_end, Some(151668));
        assert_eq!(t.think_start, Some(151667));
        assert_eq!(t.im_end, Some(151645));
        let ids = t.encode("<|im_start|>user\nHi<|im_end|>").unwrap();
        assert_eq!(ids[0], 151644);
        assert_eq!(*ids.last().unwrap(), 151645);
        assert_eq!(t.decode(&ids).unwrap(), "<|im_start|>user\nHi<|im_end|>");
    }

    #[test]
    fn streaming_emits_only_whole_utf8_and_matches_full_decode() {
        let t = qwen();
        let text = "Grüße, 世界! 🚂 trains: naïve café — ok";
        let ids = t.encode(text).unwrap();
        let mut d = Detokenizer::new();
        let mut out = String::new();
        let mut pieces = 0;
        for &id in &ids {
            if let Some(s) = d.push(&t, id).unwrap() {
                assert!(!s.contains('\u{FFFD}'), "partial character streamed: {s:?}");
                out.push_str(&s);
                pieces += 1;
            }
        }
        if let Some(s) = d.flush(&t).unwrap() {
            out.push_str(&s);
        }
        assert_eq!(out, text);
        // The emoji takes several byte-level tokens, so fewer pieces than ids.
        assert!(pieces < ids.len(), "{pieces} pieces for {} ids", ids.len());
    }

    /// The fast reader builds the tokenizer `tokenizers` builds: the same
    /// serialized form (vocabulary, merges by rank, added tokens, every
    /// component) and the same ids for text with special tokens.
    #[test]
    fn fast_reader_builds_the_same_tokenizer() {
        let json = crate::assets::qwen3_tokenizer_json();
        let fast = fast_bpe(&json).expect("Qwen3's tokenizer takes the fast path");
        let slow = Tokenizer::from_bytes(&json).unwrap();
        assert_eq!(
            serde_json::to_value(&fast).unwrap(),
            serde_json::to_value(&slow).unwrap()
        );
        let text = "<|im_start|>user\nGrüße, 世界! 🚂 don't\n\n  x<|im_end|><think>";
        assert_eq!(
            fast.encode(text, false).unwrap().get_ids(),
            slow.encode(text, false).unwrap().get_ids()
        );
    }

    /// Both forms of merges take the fast path; an added token whose id
    /// the file gives differently from where it lands, and a file
    /// `tokenizers` reads differently ("#version" merge lines), still load,
    /// through `tokenizers`.
    #[test]
    fn other_shapes_fall_back_to_the_general_reader() {
        let file = |merges: &str, added_id: u32| {
            format!(
                r#"{{"version": "1.0", "truncation": null, "padding": null,
                "added_tokens": [{{"id": {added_id}, "content": "<|end|>", "single_word": false,
                  "lstrip": false, "rstrip": false, "normalized": false, "special": true}}],
                "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
                "model": {{"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": {{"a": 0, "b": 1, "ab": 2}}, "merges": {merges}}}}}"#
            )
        };
        for fast in [file(r#"[["a", "b"]]"#, 3), file(r#"["a b"]"#, 3)] {
            let t = fast_bpe(fast.as_bytes()).expect("fast path");
            assert_eq!(t.encode("ab", false).unwrap().get_ids(), [2]);
        }
        for other in [
            file(r##"["#version: 0.2", "a b"]"##, 3),
            file(r#"[["a", "b"]]"#, 7),
        ] {
            assert!(fast_bpe(other.as_bytes()).is_none(), "{other}");
            let t = ChatTokenizer::from_bytes(other.as_bytes(), "d").unwrap();
            assert_eq!(t.encode("ab").unwrap(), [2]);
        }
    }

    #[test]
    fn missing_tokenizer_names_the_dir() {
        let e = ChatTokenizer::from_bytes(b"{not json", "/models/x")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/models/x/tokenizer.json"), "{e}");
    }
}
