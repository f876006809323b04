//! Datasets written by the `datasets` library (tests/fixtures/datasets, see its README): save_to_disk
//! directories (Arrow IPC) and a repository laid out as the hub lays it out (Parquet shards, a subset)
//! read through `resolve_data` into the same records as the JSONL files they were made from.

use std::path::{Path, PathBuf};

use dpo::data::{read_records, resolve_data, Record};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn ds(rel: &str) -> PathBuf {
    fixtures().join("datasets").join(rel)
}

fn fields(records: &[Record]) -> Vec<Map<String, Value>> {
    records.iter().map(|r| r.fields.clone()).collect()
}

fn jsonl(name: &str) -> Vec<Map<String, Value>> {
    fields(&read_records(&fixtures().join("parity/data").join(name)).unwrap())
}

fn read(spec: &Path, split: Option<&str>, subset: Option<&str>) -> Vec<Record> {
    read_records(&resolve_data(spec, split, subset).unwrap()).unwrap()
}

#[test]
fn save_to_disk_reads_as_the_jsonl_it_was_made_from() {
    let recs = read(&ds("saved"), None, None);
    assert_eq!(fields(&recs), jsonl("prefs.jsonl"));
    // Two Arrow files, numbered as one dataset.
    assert_eq!(recs.iter().map(|r| r.location.as_str()).collect::<Vec<_>>()[11..14], ["row 12", "row 13", "row 14"]);
    // Lists of int64 come back as the same token ids.
    assert_eq!(fields(&read(&ds("saved_ids"), None, None)), jsonl("prefs.tokenized.jsonl"));
}

#[test]
fn conversational_rows_are_lists_of_role_content_objects() {
    let text = jsonl("prefs.jsonl");
    let recs = read(&ds("saved_conv"), None, None);
    assert_eq!(recs.len(), 6);
    for (r, t) in recs.iter().zip(&text) {
        assert_eq!(r.fields["prompt"], serde_json::json!([{"role": "user", "content": t["prompt"]}]));
        let chosen = t["chosen"].as_str().unwrap().trim();
        assert_eq!(r.fields["chosen"], serde_json::json!([{"role": "assistant", "content": chosen}]));
    }
    // The hub layout's subset holds the same rows as Parquet.
    assert_eq!(fields(&read(&ds("hub"), None, Some("conv"))), fields(&recs));
}

#[test]
fn dataset_dict_splits() {
    let text = jsonl("prefs.jsonl");
    assert_eq!(resolve_data(&ds("dict"), None, None).unwrap(), ds("dict/train"));
    assert_eq!(fields(&read(&ds("dict"), None, None)), text[..16]);
    assert_eq!(fields(&read(&ds("dict"), Some("test"), None)), text[16..]);
    let e = resolve_data(&ds("dict"), Some("validation"), None).unwrap_err().to_string();
    assert!(e.contains("without a split `validation`") && e.contains("train, test") && e.contains("--split"), "{e}");
}

#[test]
fn hub_layout_chooses_the_split_by_file_name() {
    let text = jsonl("prefs.jsonl");
    // Two shards resolve to a pattern over them, read in order.
    let train = resolve_data(&ds("hub"), None, None).unwrap();
    assert_eq!(train, ds("hub/data/train-*.parquet"));
    assert_eq!(fields(&read_records(&train).unwrap()), text[..16]);
    let test = resolve_data(&ds("hub"), Some("test"), None).unwrap();
    assert_eq!(test, ds("hub/data/test-00000-of-00001.parquet"));
    assert_eq!(fields(&read_records(&test).unwrap()), text[16..]);

    let e = resolve_data(&ds("hub"), Some("validation"), None).unwrap_err().to_string();
    for want in ["no files of split `validation`", "splits found: test, train", "subsets (--subset) found: conv"] {
        assert!(e.contains(want), "{want:?} not in {e}");
    }
    let e = resolve_data(&ds("hub"), None, Some("other")).unwrap_err().to_string();
    assert!(e.contains("no files of split `train`") && e.contains("other"), "{e}");
    let e = read_records(&ds("hub/data/valid-*.parquet")).unwrap_err().to_string();
    assert!(e.contains("no file matches this pattern"), "{e}");
}

#[test]
fn a_file_and_a_missing_path_are_left_to_the_reader() {
    let f = fixtures().join("parity/data/prefs.jsonl");
    assert_eq!(resolve_data(&f, Some("test"), None).unwrap(), f);
    let missing = fixtures().join("no/such.jsonl");
    assert_eq!(resolve_data(&missing, None, None).unwrap(), missing);
    assert!(read_records(&missing).unwrap_err().to_string().contains("such.jsonl"));
}
