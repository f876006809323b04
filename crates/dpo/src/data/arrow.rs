//! Arrow IPC stream files (what `datasets.Dataset.save_to_disk` writes: `data-00000-of-00001.arrow`) to
//! the same JSON records the Parquet and JSON readers give. Read with the `arrow-ipc` crate; each record
//! batch's columns are converted value by value (text, integers, floats, booleans, lists, structs), so
//! that everything after reading is shared.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float16Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_schema::DataType;
use rayon::prelude::*;
use serde_json::{Map, Number, Value};

use super::read::Record;
use super::DataError;

/// Reads the rows of `files` (in order) and applies `f` to each; `first_row` numbers the first row, so
/// that a dataset split over several files is numbered as one (`row N` is `dataset[N - 1]`).
pub(crate) fn map_rows<T: Send>(
    files: &[PathBuf],
    f: &(impl Fn(Result<Record, DataError>) -> T + Sync),
) -> Result<Vec<T>, DataError> {
    let mut out = Vec::new();
    let mut row = 0usize;
    for path in files {
        let p = || path.to_path_buf();
        let file = File::open(path).map_err(|source| DataError::Io { path: p(), source })?;
        let parse_err = |location: String, message: String| DataError::Parse { path: p(), location, message };
        let reader = StreamReader::try_new(BufReader::new(file), None)
            .map_err(|e| parse_err("file".into(), format!("not an Arrow IPC stream: {e}")))?;
        for batch in reader {
            let batch = batch.map_err(|e| parse_err(format!("row {}", row + 1), format!("cannot decode: {e}")))?;
            let first = row;
            row += batch.num_rows();
            out.par_extend((0..batch.num_rows()).into_par_iter().map(|i| f(record(path, &batch, i, first + i + 1))));
        }
    }
    Ok(out)
}

fn record(path: &Path, batch: &RecordBatch, i: usize, n: usize) -> Result<Record, DataError> {
    let location = format!("row {n}");
    let mut fields = Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        let value = json(column.as_ref(), i).map_err(|message| DataError::Field {
            path: path.to_path_buf(),
            location: location.clone(),
            field: field.name().clone(),
            message,
        })?;
        fields.insert(field.name().clone(), value);
    }
    Ok(Record { location, fields })
}

/// Value `i` of `a` as JSON: lists as arrays, structs as objects, text as strings. Columns of types no
/// preference format uses (dates, decimals, dictionaries, ...) read as null; a row parser that needs
/// such a column then reports it as the wrong type.
fn json(a: &dyn Array, i: usize) -> Result<Value, String> {
    if a.is_null(i) {
        return Ok(Value::Null);
    }
    let num = |x: f64| Number::from_f64(x).map(Value::Number).unwrap_or(Value::Null);
    let text = |b: &[u8]| match std::str::from_utf8(b) {
        Ok(s) => Ok(Value::String(s.to_string())),
        Err(e) => Err(format!("binary value is not UTF-8 text ({e})")),
    };
    let list = |items: &dyn Array| -> Result<Value, String> {
        let items = (0..items.len()).map(|k| json(items, k).map_err(|e| format!("element {}: {e}", k + 1)));
        Ok(Value::Array(items.collect::<Result<_, _>>()?))
    };
    Ok(match a.data_type() {
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => a.as_primitive::<Int8Type>().value(i).into(),
        DataType::Int16 => a.as_primitive::<Int16Type>().value(i).into(),
        DataType::Int32 => a.as_primitive::<Int32Type>().value(i).into(),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i).into(),
        DataType::UInt8 => a.as_primitive::<UInt8Type>().value(i).into(),
        DataType::UInt16 => a.as_primitive::<UInt16Type>().value(i).into(),
        DataType::UInt32 => a.as_primitive::<UInt32Type>().value(i).into(),
        DataType::UInt64 => a.as_primitive::<UInt64Type>().value(i).into(),
        DataType::Float16 => num(a.as_primitive::<Float16Type>().value(i).to_f64()),
        DataType::Float32 => num(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => num(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Binary => text(a.as_binary::<i32>().value(i))?,
        DataType::LargeBinary => text(a.as_binary::<i64>().value(i))?,
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref())?,
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref())?,
        DataType::FixedSizeList(..) => list(a.as_fixed_size_list().value(i).as_ref())?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut m = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                let v = json(column.as_ref(), i).map_err(|e| format!("`{}`: {e}", field.name()))?;
                m.insert(field.name().clone(), v);
            }
            Value::Object(m)
        }
        _ => Value::Null,
    })
}
