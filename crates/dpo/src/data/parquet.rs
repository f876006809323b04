//! Parquet files (as the Hugging Face hub stores datasets) to the same JSON records the JSON readers
//! give, so that everything after reading is shared. Rows are read in chunks and converted and handed
//! on in parallel, so that a large file is never held as JSON all at once.

use std::cell::Cell;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Once;

use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::{Field, Row};
use rayon::prelude::*;
use serde_json::{Map, Number, Value};

use super::read::Record;
use super::DataError;

/// Rows decoded before each parallel step: enough to keep both cores busy, few enough to bound memory.
const CHUNK: usize = 4096;

pub(crate) fn map_rows<T: Send>(
    path: &Path,
    f: &(impl Fn(Result<Record, DataError>) -> T + Sync),
) -> Result<Vec<T>, DataError> {
    let p = || path.to_path_buf();
    let file = File::open(path).map_err(|source| DataError::Io { path: p(), source })?;
    let parse_err = |location: String, message: String| DataError::Parse { path: p(), location, message };
    let reader = match guarded(|| SerializedFileReader::new(file)) {
        Ok(Ok(reader)) => reader,
        Ok(Err(e)) => return Err(parse_err("file".into(), format!("not a readable Parquet file: {e}"))),
        Err(m) => return Err(parse_err("file".into(), format!("not a readable Parquet file: {m}"))),
    };
    // The parquet crate asserts (panics) on a column chunk with a negative offset or size; refuse it here.
    for (i, group) in reader.metadata().row_groups().iter().enumerate() {
        for c in group.columns() {
            if c.dictionary_page_offset().unwrap_or(c.data_page_offset()) < 0 || c.compressed_size() < 0 {
                let message = format!(
                    "not a readable Parquet file: row group {}, column `{}` has a negative offset or size",
                    i + 1,
                    c.column_path().string()
                );
                return Err(parse_err("file".into(), message));
            }
        }
    }
    // The footer's row count is only a hint: a corrupt one must not reserve memory for rows that are not there.
    let total = usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
    let mut out = Vec::with_capacity(total.min(CHUNK));
    let mut rows = guarded(|| reader.into_iter())
        .map_err(|m| parse_err("file".into(), format!("not a readable Parquet file: {m}")))?;
    let mut chunk: Vec<(usize, Row)> = Vec::with_capacity(CHUNK.min(total));
    loop {
        chunk.clear();
        while chunk.len() < CHUNK {
            let n = out.len() + chunk.len() + 1;
            // A page that does not decode ends the file for us: later rows cannot be found without it.
            let row = match guarded(|| rows.next()) {
                Ok(None) => break,
                Ok(Some(row)) => row.map_err(|e| format!("cannot decode: {e}")),
                Err(m) => Err(format!("cannot decode: {m}")),
            };
            chunk.push((n, row.map_err(|message| parse_err(format!("row {n}"), message))?));
        }
        if chunk.is_empty() {
            break;
        }
        out.par_extend(chunk.par_drain(..).map(|(n, row)| f(record(path, n, row))));
    }
    Ok(out)
}

thread_local! {
    /// Set while this thread runs a guarded call: its panics become errors and are not printed.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f`, a call into the parquet crate, with a panic turned into an error message: its decoders and
/// printers assert or unwrap on some malformed files (a dictionary page with fewer values than its header
/// says, a date out of range, ...) instead of returning an error. What `f` worked on is dropped.
///
/// The first call wraps the process's panic hook so that a panic caught here is not also printed (the
/// user gets the one error message naming the file); every other panic is reported as before.
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    static QUIET_HOOK: Once = Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(Cell::get) {
                previous(info);
            }
        }));
    });
    let outer = GUARDED.with(|g| g.replace(true));
    let result = catch_unwind(AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    result.map_err(|panic| {
        let what =
            panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
        format!("the Parquet reader failed ({})", what.as_deref().unwrap_or("no message"))
    })
}

fn record(path: &Path, n: usize, row: Row) -> Result<Record, DataError> {
    let location = format!("row {n}");
    let mut fields = Map::new();
    for (name, field) in row.into_columns() {
        let value = json(&field).map_err(|message| DataError::Field {
            path: PathBuf::from(path),
            location: location.clone(),
            field: name.clone(),
            message,
        })?;
        fields.insert(name, value);
    }
    Ok(Record { location, fields })
}

/// One Parquet value as JSON: lists as arrays, structs and maps as objects, text as strings. Types no
/// preference format uses (dates, decimals, ...) become their printed form, which the row parser then
/// reports as the wrong type if the column is one it reads.
fn json(field: &Field) -> Result<Value, String> {
    let num = |x: f64| Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null);
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => (*x).into(),
        Field::Short(x) => (*x).into(),
        Field::Int(x) => (*x).into(),
        Field::Long(x) => (*x).into(),
        Field::UByte(x) => (*x).into(),
        Field::UShort(x) => (*x).into(),
        Field::UInt(x) => (*x).into(),
        Field::ULong(x) => (*x).into(),
        Field::Float16(x) => num(f64::from(*x)),
        Field::Float(x) => num(f64::from(*x)),
        Field::Double(x) => num(*x),
        Field::Str(s) => Value::String(s.clone()),
        // Writers that leave out the UTF8 annotation store text as plain binary.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(e) => return Err(format!("binary value is not UTF-8 text ({e})")),
        },
        Field::Group(row) => {
            let mut m = Map::new();
            for (k, v) in row.get_column_iter() {
                m.insert(k.clone(), json(v).map_err(|e| format!("`{k}`: {e}"))?);
            }
            Value::Object(m)
        }
        Field::ListInternal(list) => {
            let items = list.elements().iter().enumerate();
            let items = items.map(|(i, v)| json(v).map_err(|e| format!("element {}: {e}", i + 1)));
            Value::Array(items.collect::<Result<_, _>>()?)
        }
        Field::MapInternal(map) => {
            let mut m = Map::new();
            for (k, v) in map.entries() {
                let key = match k {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                let v = json(v).map_err(|e| format!("`{key}`: {e}"))?;
                m.insert(key, v);
            }
            Value::Object(m)
        }
        other => {
            let printed = guarded(|| other.to_string()).map_err(|m| format!("cannot print this value: {m}"))?;
            Value::String(printed)
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use parquet::basic::{Compression, GzipLevel, ZstdLevel};
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, Int32Type, Int64Type};
    use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader, ParquetMetaDataWriter};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use serde_json::json;

    use super::super::read::map_records;
    use super::super::testutil::{chat_tokenizer, fixtures, scratch, tokenizer, write};
    use super::super::{load_pairs, load_unpaired, read_records, DataOptions, Example};
    use super::*;

    /// A column as pyarrow writes it: every field nullable, lists in the three-level LIST layout.
    pub enum Col {
        Str(&'static str, Vec<Option<String>>),
        Bin(&'static str, Vec<Vec<u8>>),
        Bool(&'static str, Vec<bool>),
        Ints(&'static str, Vec<Vec<i64>>),
        /// list<struct{role, content}>
        Msgs(&'static str, Vec<Vec<(String, String)>>),
        /// Days since 1970-01-01.
        Date(&'static str, Vec<i32>),
    }

    /// Writes `cols` (all the same number of rows) as one row group.
    pub fn write_parquet(path: &Path, cols: &[Col], compression: Compression) {
        let schema: String = cols
            .iter()
            .map(|c| match c {
                Col::Str(n, _) => format!("OPTIONAL BYTE_ARRAY {n} (UTF8);"),
                Col::Bin(n, _) => format!("OPTIONAL BYTE_ARRAY {n};"),
                Col::Bool(n, _) => format!("OPTIONAL BOOLEAN {n};"),
                Col::Date(n, _) => format!("OPTIONAL INT32 {n} (DATE);"),
                Col::Ints(n, _) => {
                    format!("OPTIONAL group {n} (LIST) {{ REPEATED group list {{ OPTIONAL INT64 element; }} }}")
                }
                Col::Msgs(n, _) => format!(
                    "OPTIONAL group {n} (LIST) {{ REPEATED group list {{ OPTIONAL group element {{ \
                     OPTIONAL BYTE_ARRAY role (UTF8); OPTIONAL BYTE_ARRAY content (UTF8); }} }} }}"
                ),
            })
            .collect();
        let schema = Arc::new(parse_message_type(&format!("message schema {{ {schema} }}")).unwrap());
        let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
        let mut w = SerializedFileWriter::new(File::create(path).unwrap(), schema, props).unwrap();
        let mut rg = w.next_row_group().unwrap();
        // Repetition levels of a list column: 0 starts a row, 1 continues its list; an empty list is one
        // level-0 entry with the list defined (1) but no element.
        fn levels<T>(rows: &[Vec<T>], full: i16) -> (Vec<i16>, Vec<i16>) {
            let (mut def, mut rep) = (vec![], vec![]);
            for r in rows {
                if r.is_empty() {
                    def.push(1);
                    rep.push(0);
                }
                for i in 0..r.len() {
                    def.push(full);
                    rep.push(if i == 0 { 0 } else { 1 });
                }
            }
            (def, rep)
        }
        let strs = |v: Vec<&String>| v.into_iter().map(|s| ByteArray::from(s.as_str())).collect::<Vec<_>>();
        for c in cols {
            let mut leaves = |write: &mut dyn FnMut(&mut parquet::file::writer::SerializedColumnWriter)| {
                let mut col = rg.next_column().unwrap().unwrap();
                write(&mut col);
                col.close().unwrap();
            };
            match c {
                Col::Str(_, v) => leaves(&mut |col| {
                    let vals = strs(v.iter().flatten().collect());
                    let def: Vec<i16> = v.iter().map(|x| x.is_some() as i16).collect();
                    col.typed::<ByteArrayType>().write_batch(&vals, Some(&def), None).unwrap();
                }),
                Col::Bin(_, v) => leaves(&mut |col| {
                    let vals: Vec<ByteArray> = v.iter().map(|b| ByteArray::from(b.clone())).collect();
                    col.typed::<ByteArrayType>().write_batch(&vals, Some(&vec![1; v.len()]), None).unwrap();
                }),
                Col::Bool(_, v) => leaves(&mut |col| {
                    col.typed::<BoolType>().write_batch(v, Some(&vec![1; v.len()]), None).unwrap();
                }),
                Col::Date(_, v) => leaves(&mut |col| {
                    col.typed::<Int32Type>().write_batch(v, Some(&vec![1; v.len()]), None).unwrap();
                }),
                Col::Ints(_, v) => leaves(&mut |col| {
                    let (def, rep) = levels(v, 3);
                    let vals: Vec<i64> = v.iter().flatten().copied().collect();
                    col.typed::<Int64Type>().write_batch(&vals, Some(&def), Some(&rep)).unwrap();
                }),
                Col::Msgs(_, v) => {
                    let (def, rep) = levels(v, 4);
                    for role in [true, false] {
                        leaves(&mut |col| {
                            let vals = strs(v.iter().flatten().map(|(r, c)| if role { r } else { c }).collect());
                            col.typed::<ByteArrayType>().write_batch(&vals, Some(&def), Some(&rep)).unwrap();
                        });
                    }
                }
            }
        }
        rg.close().unwrap();
        w.close().unwrap();
    }

    fn msgs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(r, c)| (r.to_string(), c.to_string())).collect()
    }

    fn jsonl_rows(file: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(fixtures().join("data").join(file)).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The ids of examples, without their locations ("row 3" here, "line 3" in JSONL).
    fn ids(ex: &[Example]) -> Vec<(Vec<u32>, Vec<u32>, Vec<u32>)> {
        ex.iter().map(|e| (e.prompt_ids.clone(), e.chosen_ids.clone(), e.rejected_ids.clone())).collect()
    }

    #[test]
    fn columns_become_json_records() {
        let dir = scratch("parquet-records");
        let path = dir.join("mixed.parquet");
        let cols = [
            Col::Str("prompt", vec![Some("hi".into()), None]),
            Col::Ints("ids", vec![vec![1, 2, 3], vec![]]),
            Col::Msgs("chosen", vec![msgs(&[("user", "q"), ("assistant", "a")]), msgs(&[("user", "r")])]),
            Col::Bool("label", vec![true, false]),
        ];
        write_parquet(&path, &cols, Compression::SNAPPY);
        let recs = read_records(&path).unwrap();
        assert_eq!(recs[1].location, "row 2");
        let obj = |r: &Record| Value::Object(r.fields.clone());
        assert_eq!(
            obj(&recs[0]),
            json!({"prompt": "hi", "ids": [1, 2, 3], "label": true,
                   "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
        );
        assert_eq!(
            obj(&recs[1]),
            json!({"prompt": null, "ids": [], "label": false, "chosen": [{"role": "user", "content": "r"}]})
        );
    }

    #[test]
    fn text_and_token_id_pairs_load_as_from_jsonl() {
        let tok = tokenizer();
        let want = load_pairs(&fixtures().join("data/prefs.jsonl"), Some(&tok), &DataOptions::default()).unwrap();
        let dir = scratch("parquet-pairs");

        let text = jsonl_rows("prefs.jsonl");
        let col = |k: &'static str| Col::Str(k, text.iter().map(|r| Some(r[k].as_str().unwrap().into())).collect());
        let path = dir.join("text.parquet");
        write_parquet(&path, &[col("prompt"), col("chosen"), col("rejected")], Compression::ZSTD(ZstdLevel::default()));
        let got = load_pairs(&path, Some(&tok), &DataOptions::default()).unwrap();
        assert_eq!(ids(&got.examples), ids(&want.examples));
        assert_eq!(got.examples[4].location, "row 5");

        let tokenized = jsonl_rows("prefs.tokenized.jsonl");
        let col = |k: &'static str| {
            Col::Ints(
                k,
                tokenized
                    .iter()
                    .map(|r| r[k].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
                    .collect(),
            )
        };
        let path = dir.join("ids.parquet");
        write_parquet(
            &path,
            &[col("prompt_ids"), col("chosen_ids"), col("rejected_ids")],
            Compression::GZIP(GzipLevel::default()),
        );
        let got = load_pairs(&path, None, &DataOptions::default()).unwrap();
        assert_eq!(ids(&got.examples), ids(&want.examples));
    }

    #[test]
    fn conversational_rows_load_as_from_jsonl() {
        let tok = chat_tokenizer("parquet-chat");
        let dir = scratch("parquet-chat");
        let rows = [
            (vec![("user", "What is ice?")], vec![("assistant", "Frozen water.")], true),
            (vec![("system", "Be brief."), ("user", "Hi")], vec![("assistant", "")], false),
        ];
        let path = dir.join("kto.parquet");
        let cols = [
            Col::Msgs("prompt", rows.iter().map(|r| msgs(&r.0)).collect()),
            Col::Msgs("completion", rows.iter().map(|r| msgs(&r.1)).collect()),
            Col::Bool("label", rows.iter().map(|r| r.2).collect()),
        ];
        write_parquet(&path, &cols, Compression::SNAPPY);
        let m = |v: &[(&str, &str)]| v.iter().map(|(r, c)| json!({"role": r, "content": c})).collect::<Vec<_>>();
        let jsonl: String = rows
            .iter()
            .map(|r| json!({"prompt": m(&r.0), "completion": m(&r.1), "label": r.2}).to_string() + "\n")
            .collect();
        let want = load_unpaired(&write(&dir, "kto.jsonl", jsonl), Some(&tok), &DataOptions::default()).unwrap();
        let got = load_unpaired(&path, Some(&tok), &DataOptions::default()).unwrap();
        assert_eq!(got.examples.len(), 2);
        for (g, w) in got.examples.iter().zip(&want.examples) {
            assert_eq!((&g.prompt_ids, &g.completion_ids, g.label), (&w.prompt_ids, &w.completion_ids, w.label));
        }
    }

    #[test]
    fn bad_values_and_files_are_named() {
        let dir = scratch("parquet-errors");
        let path = dir.join("bin.parquet");
        let cols = [
            Col::Bin("prompt", vec![b"fine".to_vec(), b"\xff\xfe".to_vec()]),
            Col::Ints("chosen_ids", vec![vec![1], vec![2]]),
        ];
        write_parquet(&path, &cols, Compression::SNAPPY);
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("bin.parquet, row 2, field `prompt`: binary value is not UTF-8"), "{e}");
        let e = read_records(&write(&dir, "fake.parquet", "not parquet")).unwrap_err().to_string();
        assert!(e.contains("fake.parquet, file: not a readable Parquet file"), "{e}");
        // A null where text is needed is the row's error, naming the field.
        let path = dir.join("null.parquet");
        let s = |v: &[Option<&str>]| v.iter().map(|x| x.map(String::from)).collect::<Vec<_>>();
        let cols = [
            Col::Str("prompt", s(&[Some("p"), None])),
            Col::Str("chosen", s(&[Some("c"), Some("c")])),
            Col::Str("rejected", s(&[Some("r"), Some("r")])),
        ];
        write_parquet(&path, &cols, Compression::SNAPPY);
        let e = load_pairs(&path, Some(&tokenizer()), &DataOptions::default()).unwrap_err().to_string();
        assert!(
            e.contains("null.parquet, row 2, field `prompt`: expected a string or a list of messages, found null"),
            "{e}"
        );
    }

    /// `path` (a Parquet file) with its footer rewritten by `edit`.
    fn rewrite_footer(path: &Path, out: &Path, edit: impl FnOnce(ParquetMetaData) -> ParquetMetaData) {
        let bytes = std::fs::read(path).unwrap();
        let meta = ParquetMetaDataReader::new().parse_and_finish(&File::open(path).unwrap()).unwrap();
        let footer_len = u32::from_le_bytes(bytes[bytes.len() - 8..bytes.len() - 4].try_into().unwrap()) as usize;
        let mut new = bytes[..bytes.len() - 8 - footer_len].to_vec();
        ParquetMetaDataWriter::new(&mut new, &edit(meta)).finish().unwrap();
        std::fs::write(out, new).unwrap();
    }

    #[test]
    fn corrupt_footers_are_errors_not_panics() {
        let dir = scratch("parquet-footer");
        let good = dir.join("good.parquet");
        write_parquet(&good, &[Col::Str("prompt", vec![Some("p".into())])], Compression::SNAPPY);
        // Found by `cargo fuzz run data_parquet`: the parquet crate asserts on a negative column offset.
        let negative = dir.join("negative.parquet");
        rewrite_footer(&good, &negative, |meta| {
            let groups = meta.row_groups().iter().map(|g| {
                let cols = g.columns().iter().map(|c| {
                    let c = c.clone().into_builder().set_dictionary_page_offset(None).set_data_page_offset(-5);
                    c.build().unwrap()
                });
                g.clone().into_builder().set_column_metadata(cols.collect()).build().unwrap()
            });
            meta.clone().into_builder().set_row_groups(groups.collect()).build()
        });
        let e = read_records(&negative).unwrap_err().to_string();
        assert!(e.contains("negative.parquet, file: not a readable Parquet file: row group 1, column `prompt`"), "{e}");
        // A footer claiming 2^60 rows reserves no memory for them (`Vec::with_capacity` panicked): the
        // rows that are not there are a decoding error.
        let huge = dir.join("huge.parquet");
        rewrite_footer(&good, &huge, |meta| {
            let groups =
                meta.row_groups().iter().map(|g| g.clone().into_builder().set_num_rows(1 << 60).build().unwrap());
            meta.clone().into_builder().set_row_groups(groups.collect()).build()
        });
        let e = read_records(&huge).unwrap_err().to_string();
        assert!(e.contains("huge.parquet, row 2: cannot decode"), "{e}");
    }

    #[test]
    fn panics_in_the_parquet_crate_are_errors() {
        let dir = scratch("parquet-panics");
        // Found by `cargo fuzz run data_parquet`: a dictionary page holding fewer values than its header
        // says made the parquet crate's plain decoder index past the page. Here: one value (""), and the
        // header's num_values (the bytes 0x4C 0x15 0x02: dictionary_page_header { num_values: 1 }) made 2.
        let path = dir.join("dict.parquet");
        write_parquet(&path, &[Col::Str("prompt", vec![Some(String::new())])], Compression::UNCOMPRESSED);
        let mut bytes = std::fs::read(&path).unwrap();
        let at: Vec<usize> = (0..bytes.len() - 3).filter(|&i| bytes[i..i + 3] == [0x4C, 0x15, 0x02]).collect();
        assert_eq!(at.len(), 1, "the dictionary page header is not where this test expects it");
        bytes[at[0] + 2] = 0x04;
        std::fs::write(&path, bytes).unwrap();
        let e = read_records(&path).unwrap_err().to_string();
        assert!(e.contains("dict.parquet, row 1: cannot decode: the Parquet reader failed ("), "{e}");
        // Printing a date too far from 1970 unwraps a `None` in the parquet crate.
        let path = dir.join("date.parquet");
        write_parquet(&path, &[Col::Date("when", vec![0, i32::MAX])], Compression::SNAPPY);
        let recs = map_records(&path, |r| r.map(|r| r.fields["when"].clone()).map_err(|e| e.to_string())).unwrap();
        assert_eq!(recs[0], Ok(json!("1970-01-01")));
        let e = recs[1].as_ref().unwrap_err();
        assert!(
            e.contains("date.parquet, row 2, field `when`: cannot print this value: the Parquet reader failed"),
            "{e}"
        );
    }
}
