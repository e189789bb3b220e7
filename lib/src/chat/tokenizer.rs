//! The model's `tokenizer.json` (through the `tokenizers` crate) and
//! incremental detokenization that streams only complete UTF-8 text.

use tokenizers::Tokenizer;

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
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| ChatError::BadTokenizer {
            dir: dir.to_string(),
            reason: e.to_string(),
        })?;
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

    #[test]
    fn missing_tokenizer_names_the_dir() {
        let e = ChatTokenizer::from_bytes(b"{not json", "/models/x")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/models/x/tokenizer.json"), "{e}");
    }
}
