//! Files to records. A record is one JSON object and where it came from.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::DataError;

/// Bytes one row may hold (a JSONL line; the text and ids of a JSON array element or a Parquet row). A
/// row of 128k tokens is about 1 MB of text; a longer one cannot be read by any model, and tokenizing one
/// costs about 200 bytes of memory per byte of text (a 50 MB row took 9.5 GB), so it is refused before.
pub const MAX_ROW_BYTES: usize = 8 << 20;

#[derive(Clone, Debug)]
pub struct Record {
    /// "line 12" (JSONL), "element 3" (JSON array) or "row 5" (Parquet): what error messages cite.
    pub location: String,
    pub fields: Map<String, Value>,
}

/// Reads every record of a `.jsonl` (one object per line; blank lines skipped), `.json` (an array of
/// objects, or JSON Lines as `datasets.Dataset.to_json` writes them), `.parquet` or `.arrow` (IPC stream)
/// file, of a `Dataset.save_to_disk` directory, or of the files a pattern (`data/train-*.parquet`) names. Bytes that are
/// not UTF-8 and lines that are not JSON objects are errors naming the line.
pub fn read_records(path: &Path) -> Result<Vec<Record>, DataError> {
    map_records(path, |r| r)?.into_iter().collect()
}

/// Reads `path` and applies `f` to every record, or to the error that made one line, element or row
/// unreadable (so that a caller may skip it), in parallel; the results come back in file order.
/// Problems with the file as a whole (missing, a directory, no rows, an unknown extension, a JSON array
/// that does not parse) are the outer error.
pub fn map_records<T, F>(path: &Path, f: F) -> Result<Vec<T>, DataError>
where
    T: Send,
    F: Fn(Result<Record, DataError>) -> T + Sync + Send,
{
    let p = || path.to_path_buf();
    // A row too large to tokenize is that row's error, like any other bad row.
    let f = |r: Result<Record, DataError>| f(r.and_then(|rec| check_row_size(path, rec)));
    let out = if path.is_dir() && path.join("state.json").is_file() {
        // A `Dataset.save_to_disk` directory: its Arrow files, numbered as one dataset.
        super::arrow::map_rows(&super::source::saved_dataset_files(path)?, &f)?
    } else if super::source::has_pattern(path) && !path.exists() {
        // A split's shards (`data/train-*.parquet`), in name order; a row's location names its shard (the
        // errors of a shard as a whole name its path already).
        let mut out = Vec::new();
        for file in super::source::expand_pattern(path)? {
            let shard = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let in_shard = |r: Result<Record, DataError>| {
                f(r.map(|mut rec| {
                    rec.location = format!("{shard}, {}", rec.location);
                    rec
                }))
            };
            out.extend(map_file(&file, &in_shard)?);
        }
        out
    } else {
        map_file(path, &f)?
    };
    if out.is_empty() {
        return Err(DataError::Empty { path: p() });
    }
    Ok(out)
}

/// [`map_records`] of one file, by its extension (an empty file gives no records here).
fn map_file<T: Send>(path: &Path, f: &(impl Fn(Result<Record, DataError>) -> T + Sync)) -> Result<Vec<T>, DataError> {
    let p = || path.to_path_buf();
    if path.is_dir() {
        return Err(DataError::IsDirectory { path: p() });
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    Ok(match ext.as_str() {
        "parquet" => super::parquet::map_rows(path, f)?,
        "arrow" => super::arrow::map_rows(&[path.to_path_buf()], f)?,
        "jsonl" | "ndjson" | "json" => {
            let bytes = std::fs::read(path).map_err(|source| DataError::Io { path: p(), source })?;
            let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
            // `Dataset.to_json` writes JSON Lines under a `.json` name, so the first byte decides, not the name.
            let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
            if ext == "json" && first == Some(&b'[') {
                json_array(path, bytes, f)?
            } else {
                jsonl(path, bytes, f)
            }
        }
        _ => return Err(DataError::UnsupportedFormat { path: p(), ext }),
    })
}

fn jsonl<T: Send>(path: &Path, bytes: &[u8], f: &(impl Fn(Result<Record, DataError>) -> T + Sync)) -> Vec<T> {
    let lines: Vec<(usize, &[u8])> = bytes.split(|&b| b == b'\n').enumerate().collect();
    lines
        .into_par_iter()
        .filter_map(|(i, line)| {
            let location = format!("line {}", i + 1);
            let parse_err =
                |message: String| DataError::Parse { path: PathBuf::from(path), location: location.clone(), message };
            let raw = match std::str::from_utf8(line) {
                Ok(t) => t,
                Err(e) => return Some(f(Err(parse_err(format!("not UTF-8 text ({e})"))))),
            };
            let text = raw.trim();
            if text.is_empty() {
                return None;
            }
            // Before parsing: a huge line costs several times its size as JSON values.
            if text.len() > MAX_ROW_BYTES {
                return Some(f(Err(parse_err(too_large(text.len())))));
            }
            let record = match serde_json::from_str(text) {
                Ok(Value::Object(fields)) => Ok(Record { location: location.clone(), fields }),
                Ok(other) => Err(parse_err(format!("expected a JSON object, found {}", kind(&other)))),
                Err(e) => {
                    let (column, message) = json_error_in_line(raw, raw.len() - raw.trim_start().len(), &e);
                    let location = format!("{location}, column {column}");
                    Err(DataError::Parse { path: PathBuf::from(path), location, message })
                }
            };
            Some(f(record))
        })
        .collect()
}

/// A JSON Lines row's syntax error in the file's terms: the column in the file's line (characters from
/// 1; the parser saw the line without its `lead` bytes of leading white space) and the parser's message
/// without its position ("at line 1 column N", which counts within the row, not the file).
fn json_error_in_line(line: &str, lead: usize, e: &serde_json::Error) -> (usize, String) {
    let full = e.to_string();
    let position = format!(" at line {} column {}", e.line(), e.column());
    let message = full.strip_suffix(&position).unwrap_or(&full);
    // serde_json counts columns in bytes, the last one read; its column 0 is before the first.
    let mut end = (lead + e.column()).min(line.len());
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    (line[..end].chars().count().max(1), format!("invalid JSON: {message}"))
}

fn json_array<T: Send>(
    path: &Path,
    bytes: &[u8],
    f: &(impl Fn(Result<Record, DataError>) -> T + Sync),
) -> Result<Vec<T>, DataError> {
    let err = |location: String, message: String| DataError::Parse { path: PathBuf::from(path), location, message };
    // One array is one parse: an error here is the file's, cited by the line it is on.
    if let Err(e) = std::str::from_utf8(bytes) {
        let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
        return Err(err(format!("line {line}"), format!("not UTF-8 text ({e})")));
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| err("file".into(), format!("invalid JSON: {e}")))?;
    let Value::Array(items) = value else {
        return Err(err("file".into(), format!("expected a JSON array of objects, found {}", kind(&value))));
    };
    Ok(items
        .into_par_iter()
        .enumerate()
        .map(|(i, v)| {
            let location = format!("element {}", i + 1);
            f(match v {
                Value::Object(fields) => Ok(Record { location, fields }),
                other => {
                    let message = format!("expected a JSON object, found {}", kind(&other));
                    Err(err(location, message))
                }
            })
        })
        .collect())
}

fn too_large(bytes: usize) -> String {
    format!(
        "the row holds {:.1} MiB, more than the {} MiB a row may hold (longer than any model's context; is the \
         file one record per line?)",
        bytes as f64 / (1 << 20) as f64,
        MAX_ROW_BYTES >> 20
    )
}

/// Refuses a record whose text and ids add up to more than [`MAX_ROW_BYTES`].
fn check_row_size(path: &Path, rec: Record) -> Result<Record, DataError> {
    fn size(v: &Value) -> usize {
        match v {
            Value::String(s) => s.len(),
            Value::Array(a) => a.iter().map(|x| size(x).max(1)).sum(),
            Value::Object(o) => o.iter().map(|(k, x)| k.len() + size(x)).sum(),
            _ => 1,
        }
    }
    let bytes: usize = rec.fields.iter().map(|(k, v)| k.len() + size(v)).sum();
    if bytes > MAX_ROW_BYTES {
        return Err(DataError::Parse { path: path.to_path_buf(), location: rec.location, message: too_large(bytes) });
    }
    Ok(rec)
}

/// "a string", "an array", ...: for messages about wrong types.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{scratch, write};
    use super::*;

    fn err(path: &Path) -> String {
        read_records(path).unwrap_err().to_string()
    }

    #[test]
    fn jsonl_skips_blank_lines_and_names_lines() {
        let dir = scratch("read-jsonl");
        let path = write(&dir, "a.jsonl", "\u{feff}{\"a\": 1}\n\n  \r\n{\"a\": 2}\r\n");
        let recs = read_records(&path).unwrap();
        assert_eq!(recs.iter().map(|r| r.location.as_str()).collect::<Vec<_>>(), ["line 1", "line 4"]);
        assert_eq!(recs[1].fields["a"], 2);
    }

    #[test]
    fn json_array_and_json_lines_under_a_json_name() {
        let dir = scratch("read-json");
        let recs = read_records(&write(&dir, "a.json", "[{\"a\": 1},\n {\"a\": 2}]")).unwrap();
        assert_eq!((recs.len(), recs[1].location.as_str()), (2, "element 2"));
        // `datasets.Dataset.to_json` writes JSON Lines with a .json name.
        let recs = read_records(&write(&dir, "b.json", "{\"a\": 1}\n{\"a\": 2}\n")).unwrap();
        assert_eq!((recs.len(), recs[1].location.as_str()), (2, "line 2"));
        let e = err(&write(&dir, "c.json", "[{\"a\": 1}, 3]"));
        assert!(e.contains("c.json, element 2: expected a JSON object, found a number"), "{e}");
        let e = err(&write(&dir, "d.json", b"[{\"a\": 1},\n{\"a\": \"\xff\"}]"));
        assert!(e.contains("d.json, line 2: not UTF-8"), "{e}");
        let e = err(&write(&dir, "e.json", "[{\"a\": 1},\n{\"a\" 2}]"));
        assert!(e.contains("e.json, file: invalid JSON") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let dir = scratch("read-errors");
        let e = err(&write(&dir, "bad.jsonl", "{\"a\": 1}\n{\"a\": \n"));
        assert!(e.contains("bad.jsonl, line 2, column 5: invalid JSON: EOF while parsing a value"), "{e}");
        assert!(!e.contains("line 1"), "{e}");
        // The column counts characters of the file's line, its leading white space included.
        let e = err(&write(&dir, "col.jsonl", "{\"a\": 1}\n  {\"é\": 1 2}\n"));
        assert!(e.contains("col.jsonl, line 2, column 11: invalid JSON: expected `,` or `}`"), "{e}");
        let e = err(&write(&dir, "arr.jsonl", "{\"a\": 1}\n[1, 2]\n"));
        assert!(e.contains("arr.jsonl, line 2: expected a JSON object, found an array"), "{e}");
        let e = err(&write(&dir, "bytes.jsonl", b"{\"a\": 1}\n{\"a\": \"\xc3\x28\"}\n"));
        assert!(e.contains("bytes.jsonl, line 2: not UTF-8 text"), "{e}");
        let e = err(&write(&dir, "empty.jsonl", "\n\n"));
        assert!(e.contains("empty.jsonl holds no rows"), "{e}");
        let e = err(&write(&dir, "empty.json", "[]"));
        assert!(e.contains("empty.json holds no rows"), "{e}");
        let e = err(&dir);
        assert!(e.contains("read-errors is a directory"), "{e}");
        let e = err(&write(&dir, "data.csv", "a,b"));
        assert!(e.contains("unsupported file type \"csv\""), "{e}");
        let e = err(&dir.join("missing.jsonl"));
        assert!(e.contains("cannot read") && e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn a_row_larger_than_the_limit_is_refused_naming_file_and_line() {
        let dir = scratch("read-huge");
        let huge = "x".repeat(MAX_ROW_BYTES + 1);
        let text = format!("{{\"a\": 1}}\n{{\"a\": \"{huge}\"}}\n");
        let e = err(&write(&dir, "huge.jsonl", &text));
        assert!(e.contains("huge.jsonl, line 2: the row holds 8.0 MiB, more than the 8 MiB a row may hold"), "{e}");
        let e = err(&write(&dir, "huge.json", format!("[{{\"a\": 1}}, {{\"a\": \"{huge}\"}}]")));
        assert!(e.contains("huge.json, element 2: the row holds 8.0 MiB"), "{e}");
        // Skippable like any bad row.
        let out = map_records(&write(&dir, "skip.jsonl", &text), |r| r.is_ok()).unwrap();
        assert_eq!(out, [true, false]);
    }

    #[test]
    fn map_records_keeps_file_order() {
        let dir = scratch("read-order");
        let text: String = (0..5000).map(|i| format!("{{\"i\": {i}}}\n")).collect();
        let out = map_records(&write(&dir, "many.jsonl", text), |r| r.unwrap().fields["i"].as_u64().unwrap()).unwrap();
        assert_eq!(out, (0..5000).collect::<Vec<u64>>());
    }
}
