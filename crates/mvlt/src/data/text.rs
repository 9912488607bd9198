//! Text: bert-base-uncased WordPiece exactly as the reference's `text_process`, and the
//! pre-training corruptions (MLM masking, ITM pairing).
//!
//! Tokenisation goes through Hugging Face `tokenizers` (BertNormalizer: clean text, CJK split,
//! lower-case + accent stripping; BertPreTokenizer; WordPiece with `##` continuations), which gives
//! the reference's slow BertTokenizer pieces on all fixture cases.

use anyhow::{anyhow, bail, Result};
use rand::Rng;
use std::path::{Path, PathBuf};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::Tokenizer;

/// The special tokens every BERT vocabulary must hold.
pub const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// MLM label of positions that are not predicted (the reference uses -1, not -100).
pub const IGNORE: i64 = -1;

/// A text with its word pieces and the fixed-length model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// WordPiece tokens before truncation: all of them, or, for a text of more than
    /// [`MAX_TEXT_TOKENS`] pieces, at least the first [`MAX_TEXT_TOKENS`] (see [`prefix_with_pieces`]).
    pub tokens: Vec<String>,
    /// `[CLS] + first T-2 piece ids + [SEP] + [PAD]...`, length T.
    pub input_ids: Vec<i64>,
    /// Whether pieces were dropped to fit.
    pub truncated: bool,
}

pub struct TextProcessor {
    tokenizer: Tokenizer,
    pub vocab_path: PathBuf,
    pub vocab_size: usize,
    pub pad_id: i64,
    pub unk_id: i64,
    pub cls_id: i64,
    pub sep_id: i64,
    pub mask_id: i64,
    /// Ids that MLM never picks as a random replacement and never masks (the specials).
    special_ids: Vec<i64>,
}

/// Longest text handed to the tokenizer, which holds every piece of its input though only T - 2
/// are kept. Longer texts are first cut to a prefix that holds the same first pieces
/// ([`prefix_with_pieces`]); one still longer than this (no spaces to cut at) is refused.
/// Fashion-Gen's longest caption is about 1 KiB.
pub const MAX_TEXT_BYTES: usize = 256 << 10;
/// Longest caption a catalogue row or a request may carry: a product description is a few hundred
/// bytes (Fashion-Gen's longest about 1 KiB); longer rows are skipped, longer requests refused.
pub const MAX_CAPTION_BYTES: usize = 64 << 10;
/// Largest text length T: the position table of every PVLT has 512 rows.
pub const MAX_TEXT_TOKENS: usize = 512;

/// T must hold [CLS] and [SEP] and fit the position table.
pub fn check_max_len(max_len: usize) -> Result<()> {
    if !(2..=MAX_TEXT_TOKENS).contains(&max_len) {
        bail!("the text length T must be between 2 ([CLS] and [SEP]) and {MAX_TEXT_TOKENS} (the position table), got {max_len}");
    }
    Ok(())
}

impl TextProcessor {
    /// Load a WordPiece vocabulary (one token per line, id = line number).
    pub fn from_vocab_file(path: &Path) -> Result<Self> {
        let text = crate::files::read_text_limited(path, "vocabulary file", crate::files::MAX_VOCAB_FILE_BYTES)?;
        let vocab: ahash::AHashMap<String, u32> =
            text.lines().enumerate().map(|(i, l)| (l.trim_end_matches('\r').to_string(), i as u32)).collect();
        let id = |t: &str| -> Result<i64> {
            vocab.get(t).map(|&i| i as i64).ok_or_else(|| {
                anyhow!("{} is not a BERT WordPiece vocabulary: it has no '{t}' token (expected one token per line, e.g. bert-base-uncased-vocab.txt)", path.display())
            })
        };
        let ids: Vec<i64> = SPECIALS.iter().map(|t| id(t)).collect::<Result<_>>()?;
        if vocab.len() < 6 {
            bail!("vocabulary file {} holds only {} tokens", path.display(), vocab.len());
        }
        let vocab_size = text.lines().count();
        // The map read above (once) feeds the tokenizer too, so both agree on every id.
        let wp = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(|e| anyhow!("vocabulary {}: {e}", path.display()))?;
        let mut tokenizer = Tokenizer::new(wp);
        tokenizer.with_normalizer(Some(BertNormalizer::new(true, true, None, true)));
        tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
        Ok(TextProcessor {
            tokenizer,
            vocab_path: path.to_path_buf(),
            vocab_size,
            pad_id: ids[0],
            unk_id: ids[1],
            cls_id: ids[2],
            sep_id: ids[3],
            mask_id: ids[4],
            special_ids: ids,
        })
    }

    /// WordPiece tokens and ids of a text (no specials). Texts over [`MAX_TEXT_BYTES`] are refused.
    pub fn tokenize(&self, text: &str) -> Result<(Vec<String>, Vec<i64>)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizing {:?}: {e}", truncate_for_message(text)))?;
        Ok((enc.get_tokens().to_vec(), enc.get_ids().iter().map(|&i| i as i64).collect()))
    }

    /// The reference's `text_process`: keep at most T-2 pieces, then `[CLS] pieces [SEP] [PAD]...`.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Encoded> {
        check_max_len(max_len)?;
        // Cut at the longest T any model has, not at this T: `tokens` then lists every piece of
        // any ordinary text, as the reference's tokenizer does, and a huge one costs 512 pieces.
        let text = prefix_with_pieces(text, MAX_TEXT_TOKENS);
        if text.len() > MAX_TEXT_BYTES {
            bail!("the text has {} bytes without a space, over the limit of {MAX_TEXT_BYTES} bytes", text.len());
        }
        let (tokens, ids) = self.tokenize(text)?;
        let keep = ids.len().min(max_len - 2);
        let mut input_ids = Vec::with_capacity(max_len);
        input_ids.push(self.cls_id);
        input_ids.extend_from_slice(&ids[..keep]);
        input_ids.push(self.sep_id);
        input_ids.resize(max_len, self.pad_id);
        Ok(Encoded { truncated: keep < ids.len(), tokens, input_ids })
    }

    /// MLM corruption: each word piece (not [CLS]/[SEP]/[PAD]) is chosen with the policy's
    /// probability (the reference: [`MLM_PROBABILITY`] for every piece); a chosen one becomes [MASK]
    /// 80%, a uniformly random vocabulary id 10%, stays 10%. Returns the corrupted ids and labels
    /// (original id where chosen, -1 elsewhere). One draw per piece whatever the policy, so a focus
    /// list changes which pieces are chosen, never the random stream of the rest.
    pub fn mask_tokens(&self, input_ids: &[i64], policy: &MlmPolicy, rng: &mut impl Rng) -> (Vec<i64>, Vec<i64>) {
        let mut ids = input_ids.to_vec();
        let mut labels = vec![IGNORE; ids.len()];
        for (i, id) in ids.iter_mut().enumerate() {
            if self.special_ids.contains(id) && *id != self.unk_id {
                continue;
            }
            if rng.random::<f64>() >= policy.probability_of(*id) {
                continue;
            }
            labels[i] = *id;
            let r = rng.random::<f64>();
            if r < 0.8 {
                *id = self.mask_id;
            } else if r < 0.9 {
                *id = rng.random_range(0..self.vocab_size as i64);
            }
        }
        (ids, labels)
    }

    /// The word-piece ids of `words` (every piece of each; unknown ones left out), for
    /// [`MlmPolicy::focus_ids`].
    pub fn piece_ids(&self, words: &[String]) -> Result<Vec<i64>> {
        let mut ids = vec![];
        for w in words {
            let (_, pieces) = self.tokenize(w)?;
            ids.extend(pieces.into_iter().filter(|&i| i != self.unk_id));
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }
}

/// Which word pieces MLM chooses. The reference chooses every piece with one probability; a
/// focus list chooses some pieces (attribute words: colours, patterns, garments) more often, so
/// that MLM cannot be solved from the caption alone and the text has to read the image.
#[derive(Clone, Debug, PartialEq)]
pub struct MlmPolicy {
    pub probability: f64,
    /// Sorted piece ids chosen with `focus_probability` instead.
    pub focus_ids: Vec<i64>,
    pub focus_probability: f64,
}

impl MlmPolicy {
    /// The reference's: every piece with probability `p`.
    pub fn uniform(p: f64) -> MlmPolicy {
        MlmPolicy { probability: p, focus_ids: vec![], focus_probability: p }
    }

    pub fn probability_of(&self, id: i64) -> f64 {
        if self.focus_ids.binary_search(&id).is_ok() {
            self.focus_probability
        } else {
            self.probability
        }
    }
}

impl Default for MlmPolicy {
    fn default() -> Self {
        MlmPolicy::uniform(MLM_PROBABILITY)
    }
}

/// The reference's share of word pieces chosen for MLM.
pub const MLM_PROBABILITY: f64 = 0.15;

/// ITM pairing for pre-training: with p = 0.5 keep the item's own caption (label 1), else take the
/// caption of another product (label 0). Like the reference, the partner is found by jumping a
/// random 50..N/2 items ahead (wrapping), stepping on while the product id is the same.
/// Returns (caption index, label).
pub fn itm_pair(index: usize, product_ids: &[String], rng: &mut impl Rng) -> (usize, i64) {
    let n = product_ids.len();
    if rng.random::<f64>() < 0.5 || n < 2 {
        return (index, 1);
    }
    let (lo, hi) = (50.min(n / 2).max(1), (n / 2).max(2));
    let mut j = (index + rng.random_range(lo..hi.max(lo + 1))) % n;
    for _ in 0..n {
        if product_ids[j] != product_ids[index] {
            return (j, 0);
        }
        j = (j + 1) % n;
    }
    (index, 1) // every item is the same product: no negative exists
}

/// The shortest prefix of `text` that surely holds at least `n` word pieces, cut where a piece
/// surely ends; the whole text when it may hold fewer. Its pieces are exactly the first pieces
/// of the whole text. BERT's pre-tokenizer ends a word at every space and makes every
/// punctuation character a word of its own, and no word gives fewer than one piece (a word too
/// long for WordPiece becomes one [UNK]); the normaliser never removes ASCII letters, digits or
/// punctuation. So each ASCII punctuation byte counts one piece and ends a word, each run of ASCII
/// letters and digits begins at most one more piece in the word it belongs to, and the text may
/// be cut before an ASCII space or after an ASCII punctuation byte. A 7 MB caption, or 64 KiB of
/// "!!!" without a space, costs its first pieces, and encodes exactly as the reference's
/// `text_process` would. (Other bytes, non-ASCII letters, accents and control characters, may
/// join a word or vanish; they are never counted.)
pub fn prefix_with_pieces(text: &str, n: usize) -> &str {
    let (mut count, mut in_counted_word) = (0usize, false);
    for (i, b) in text.bytes().enumerate() {
        if b == b' ' || b == b'\t' || b == b'\n' || b == b'\r' {
            if count >= n {
                return &text[..i];
            }
            in_counted_word = false;
        } else if b.is_ascii_punctuation() {
            count += 1;
            in_counted_word = false;
            if count >= n {
                return &text[..=i];
            }
        } else if b.is_ascii_alphanumeric() && !in_counted_word {
            count += 1;
            in_counted_word = true;
        }
    }
    text
}

fn truncate_for_message(t: &str) -> String {
    if t.chars().count() > 60 {
        format!("{}...", t.chars().take(60).collect::<String>())
    } else {
        t.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny_vocab() -> tempfile::NamedTempFile {
        let mut lines: Vec<String> = vec!["[PAD]".into()];
        lines.extend((1..100).map(|i| format!("[unused{i}]")));
        lines.extend(["[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "dress", "##es", "silk", "."].map(String::from));
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), lines.join("\n")).unwrap();
        f
    }

    /// The prefix cut changes nothing: same pieces (as far as they are kept) and ids, on texts with
    /// punctuation, accents, CJK, control characters, tabs and long runs without spaces.
    #[test]
    fn long_texts_encode_as_their_prefix() {
        let t = TextProcessor::from_vocab_file(tiny_vocab().path()).unwrap();
        let words = [
            "red",
            "dress.",
            "Réd",
            "silk\u{0B}dress",
            "中文",
            "\u{1}\u{2}",
            "!!",
            "a\tb",
            "dresses",
            "!!!!!!!!",
            ".,;:",
            "é!",
            "a.b",
            "(x)",
            "x".repeat(150).leak(),
            "\u{301}e",
            "",
            " ",
        ];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for _ in 0..200 {
            let n = rng.random_range(0..60);
            let text: Vec<&str> = (0..n).map(|_| words[rng.random_range(0..words.len())]).collect();
            let text = text.join(" ");
            for max_len in [2, 3, 5, 8, 16] {
                let cut = prefix_with_pieces(&text, max_len);
                let (all, _) = t.tokenize(&text).unwrap();
                let (head, _) = t.tokenize(cut).unwrap();
                assert!(head.len() >= max_len.min(all.len()), "{text:?} cut to {cut:?}");
                assert_eq!(head[..], all[..head.len()], "{text:?} cut to {cut:?}");
                let full = t.encode(&text, max_len).unwrap();
                assert_eq!(full.input_ids, t.encode(cut, max_len).unwrap().input_ids);
                assert_eq!(full.truncated, all.len() > max_len - 2, "{text:?}");
            }
        }
        // 7 MB of words, or 64 KiB of punctuation without a space: the prefix, not every piece;
        // 300 KB of one word: refused.
        let e = t.encode(&"red ".repeat(7 << 18), 8).unwrap();
        assert!(e.truncated && e.tokens.len() == MAX_TEXT_TOKENS);
        for junk in ["!".repeat(64 << 10), "!?.,".repeat(16 << 10), "é!".repeat(20 << 10)] {
            let e = t.encode(&junk, 8).unwrap();
            assert!(e.truncated && e.tokens.len() <= 2 * MAX_TEXT_TOKENS, "{} pieces", e.tokens.len());
        }
        assert!(t.encode(&"r".repeat(300 << 10), 8).unwrap_err().to_string().contains("without a space"));
    }

    #[test]
    fn encode_pads_and_truncates() {
        let t = TextProcessor::from_vocab_file(tiny_vocab().path()).unwrap();
        let e = t.encode("Red dresses. SILK", 8).unwrap();
        assert_eq!(e.tokens, ["red", "dress", "##es", ".", "silk"]);
        assert_eq!(e.input_ids, [101, 104, 105, 106, 108, 107, 102, 0]);
        let e = t.encode("red red red red red red red", 5).unwrap();
        assert!(e.truncated);
        assert_eq!(e.input_ids, [101, 104, 104, 104, 102]);
        let e = t.encode("zebra", 4).unwrap();
        assert_eq!(e.input_ids, [101, 100, 102, 0]);
    }

    #[test]
    fn masking_is_seeded_and_follows_80_10_10() {
        let t = TextProcessor::from_vocab_file(tiny_vocab().path()).unwrap();
        let ids: Vec<i64> = std::iter::once(101).chain(std::iter::repeat_n(104, 20000)).chain([102, 0]).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (a, la) = t.mask_tokens(&ids, &MlmPolicy::default(), &mut rng);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        assert_eq!((a.clone(), la.clone()), t.mask_tokens(&ids, &MlmPolicy::default(), &mut rng));
        assert_eq!((la[0], la[20001], la[20002]), (IGNORE, IGNORE, IGNORE), "specials never masked");
        let chosen = la.iter().filter(|&&l| l != IGNORE).count() as f64 / 20000.0;
        assert!((chosen - 0.15).abs() < 0.01, "{chosen}");
        let masked = a.iter().zip(&la).filter(|(&x, &l)| l != IGNORE && x == 103).count() as f64;
        let kept = a.iter().zip(&la).filter(|(&x, &l)| l != IGNORE && x == l).count() as f64;
        let n = chosen * 20000.0;
        assert!((masked / n - 0.8).abs() < 0.03 && (kept / n - 0.1).abs() < 0.03, "{} {}", masked / n, kept / n);
        assert!(la.iter().all(|&l| l == IGNORE || l == 104));
        // Another share when asked.
        let (_, l4) = t.mask_tokens(&ids, &MlmPolicy::uniform(0.4), &mut rng);
        let chosen = l4.iter().filter(|&&l| l != IGNORE).count() as f64 / 20000.0;
        assert!((chosen - 0.4).abs() < 0.015, "{chosen}");
    }

    #[test]
    fn focus_words_are_chosen_more_often_on_the_same_random_stream() {
        let t = TextProcessor::from_vocab_file(tiny_vocab().path()).unwrap();
        // "red" (104) and "silk" (108) alternate; only "red" is in focus.
        let ids: Vec<i64> = std::iter::once(101).chain((0..20000).map(|i| [104, 108][i % 2])).chain([102]).collect();
        let focus =
            MlmPolicy { focus_ids: t.piece_ids(&["Red".into(), "zebra".into()]).unwrap(), ..MlmPolicy::uniform(0.1) };
        assert_eq!(focus.focus_ids, [104], "unknown words add nothing");
        let focus = MlmPolicy { focus_probability: 0.6, ..focus };
        let (_, l) = t.mask_tokens(&ids, &focus, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        let share = |w: i64| l.iter().filter(|&&x| x == w).count() as f64 / 10000.0;
        assert!((share(104) - 0.6).abs() < 0.02 && (share(108) - 0.1).abs() < 0.015, "{} {}", share(104), share(108));
        // With the focus probability equal to the base one the policy is the reference's, draw for draw.
        let same = MlmPolicy { focus_probability: 0.1, ..focus.clone() };
        let mut r1 = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut r2 = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        assert_eq!(t.mask_tokens(&ids, &same, &mut r1), t.mask_tokens(&ids, &MlmPolicy::uniform(0.1), &mut r2));
    }

    #[test]
    fn itm_pairs_are_balanced_and_negatives_are_other_products() {
        let pids: Vec<String> = (0..400).map(|i| format!("p{}", i / 2)).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut pos = 0;
        for i in 0..400 {
            let (j, label) = itm_pair(i, &pids, &mut rng);
            if label == 1 {
                pos += 1;
                assert_eq!(j, i);
            } else {
                assert_ne!(pids[j], pids[i]);
            }
        }
        assert!((150..250).contains(&pos), "{pos}");
    }

    #[test]
    fn rejects_files_that_are_not_wordpiece_vocabularies() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let p = dir.join("v.txt");
        std::fs::write(&p, "hello\nworld\n").unwrap();
        let e = TextProcessor::from_vocab_file(&p).err().unwrap().to_string();
        assert!(e.contains("not a BERT WordPiece vocabulary") && e.contains("[PAD]"), "{e}");
        let e = TextProcessor::from_vocab_file(&dir.join("absent.txt")).err().unwrap().to_string();
        assert!(e.contains("vocabulary file") && e.contains("absent.txt does not exist"), "{e}");
        std::fs::write(&p, [0xffu8, 0xfe, 0x00]).unwrap();
        assert!(TextProcessor::from_vocab_file(&p).err().unwrap().to_string().contains("not UTF-8"));
    }
}
