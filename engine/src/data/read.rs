//! Reading records out of JSONL, JSON-array and CSV files, each with the 1-based line on which
//! it starts, so that every later error can name `file:line`.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One raw record and the line it starts on.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// 1-based line number in the file.
    pub line: usize,
    /// The record as a JSON object.
    pub value: Value,
}

/// Reads all records of a `.jsonl`, `.json` or `.csv` file (chosen by extension, or by the
/// first non-blank character for other names). Syntax errors are returned per record in the
/// second vector so that `--skip-invalid` can report and skip them.
pub fn read_records(path: &Path) -> Result<(Vec<RawRecord>, Vec<Error>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "csv" => read_csv(path, &text),
        "jsonl" | "ndjson" => Ok(read_jsonl(path, &text)),
        "json" => {
            if text.trim_start().starts_with('[') {
                read_json_array(path, &text)
            } else {
                Ok(read_jsonl(path, &text))
            }
        }
        _ => {
            if text.trim_start().starts_with('[') {
                read_json_array(path, &text)
            } else {
                Ok(read_jsonl(path, &text))
            }
        }
    }
}

fn read_jsonl(path: &Path, text: &str) -> (Vec<RawRecord>, Vec<Error>) {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(value) => records.push(RawRecord { line: i + 1, value }),
            Err(e) => errors.push(Error::Data {
                path: path.to_path_buf(),
                line: i + 1,
                message: format!("invalid JSON: {e}"),
            }),
        }
    }
    (records, errors)
}

fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn read_json_array(path: &Path, text: &str) -> Result<(Vec<RawRecord>, Vec<Error>)> {
    let bytes = text.as_bytes();
    let mut pos = text.find('[').map(|p| p + 1).unwrap_or(0);
    let mut records = Vec::new();
    let skip = |pos: &mut usize| {
        while *pos < bytes.len() && (bytes[*pos].is_ascii_whitespace() || bytes[*pos] == b',') {
            *pos += 1;
        }
    };
    loop {
        skip(&mut pos);
        if pos >= bytes.len() {
            return Err(Error::Data {
                path: path.to_path_buf(),
                line: line_of(text, pos),
                message: "unterminated JSON array".into(),
            });
        }
        if bytes[pos] == b']' {
            break;
        }
        let mut stream = serde_json::Deserializer::from_str(&text[pos..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                records.push(RawRecord {
                    line: line_of(text, pos),
                    value,
                });
                pos += stream.byte_offset();
            }
            Some(Err(e)) => {
                // A syntax error inside an array makes the rest unreadable.
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: line_of(text, pos) + e.line().saturating_sub(1),
                    message: format!("invalid JSON: {e}"),
                });
            }
            None => break,
        }
    }
    Ok((records, Vec::new()))
}

fn read_csv(path: &Path, text: &str) -> Result<(Vec<RawRecord>, Vec<Error>)> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: 1,
            message: format!("CSV header: {e}"),
        })?
        .clone();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for row in reader.records() {
        match row {
            Ok(row) => {
                let line = row.position().map(|p| p.line() as usize).unwrap_or(0);
                let mut obj = Map::new();
                for (h, cell) in headers.iter().zip(row.iter()) {
                    // Cells that hold JSON lists/objects (messages, conversations) are parsed.
                    let trimmed = cell.trim_start();
                    let v = if trimmed.starts_with('[') || trimmed.starts_with('{') {
                        serde_json::from_str(cell).unwrap_or_else(|_| Value::String(cell.into()))
                    } else {
                        Value::String(cell.to_string())
                    };
                    obj.insert(h.to_string(), v);
                }
                records.push(RawRecord {
                    line,
                    value: Value::Object(obj),
                });
            }
            Err(e) => errors.push(Error::Data {
                path: path.to_path_buf(),
                line: e.position().map(|p| p.line() as usize).unwrap_or(0),
                message: format!("CSV: {e}"),
            }),
        }
    }
    Ok((records, errors))
}
