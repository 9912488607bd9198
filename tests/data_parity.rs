//! Tokenizer and image preprocessing against the reference (../shared/fixtures/reference).
mod common;

use mvlt::data::text::TextProcessor;

fn vocab(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join("../vocab/bert-base-uncased-vocab.txt")
}

#[test]
fn tokenizer_matches_all_reference_cases() {
    let Some(dir) = common::fixtures() else { return };
    let t = TextProcessor::from_vocab_file(&vocab(&dir)).unwrap();
    assert_eq!(t.vocab_size, 30522);
    assert_eq!((t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id), (0, 100, 101, 102, 103));
    let cases: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_cases.json")).unwrap()).unwrap();
    let items = cases["items"].as_array().unwrap();
    assert_eq!(items.len(), 40);
    let mut failures = vec![];
    for (i, item) in items.iter().enumerate() {
        let text = item["text"].as_str().unwrap();
        let want_tokens: Vec<String> = serde_json::from_value(item["tokens"].clone()).unwrap();
        let want_ids: Vec<i64> = serde_json::from_value(item["ori_input_ids"].clone()).unwrap();
        let e = t.encode(text, want_ids.len()).unwrap();
        if e.tokens != want_tokens || e.input_ids != want_ids || e.truncated != item["truncated"].as_bool().unwrap() {
            failures.push(format!("case {i} {text:?}:\n  ours   {:?}\n  theirs {:?}", e.tokens, want_tokens));
        }
    }
    assert!(failures.is_empty(), "{} of 40 cases differ:\n{}", failures.len(), failures.join("\n"));
}
