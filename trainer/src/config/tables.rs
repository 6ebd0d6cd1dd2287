//! A `--config` file with `[[adapter]]` tables: its top-level settings and, per table, the name
//! and the settings of one adapter. A table may set any per-adapter setting; one of the whole run
//! ([`SHARED_KEYS`]) or an unknown key is an error naming the key, the table, the file and the
//! line.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::plan::SHARED_KEYS;
use super::{line_of, toml_error, TrainArgs};
use crate::error::{Error, Result};

/// The TOML key of the tables (`[[adapter]]`); at the top level, a string there is the kind.
const TABLES_KEY: &str = "adapter";

/// The settings of a `--config` file.
#[derive(Debug, Default)]
pub(super) struct ConfigFile {
    /// The top-level settings.
    pub top: TrainArgs,
    /// The `[[adapter]]` tables, in file order.
    pub tables: Vec<AdapterTable>,
}

/// One `[[adapter]]` table.
#[derive(Debug)]
pub(super) struct AdapterTable {
    pub name: String,
    /// The line of the table's `name`, for errors about the table as a whole.
    pub line: usize,
    /// The settings it gives.
    pub args: TrainArgs,
}

impl ConfigFile {
    /// Reads a TOML file; its relative paths (top level and tables) are resolved against the
    /// file's folder.
    pub fn read(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut f = Self::parse(&path.display().to_string(), &text)?;
        let base = path.parent().unwrap_or(Path::new(""));
        f.top.paths_relative_to(base);
        for t in &mut f.tables {
            t.args.paths_relative_to(base);
        }
        Ok(f)
    }

    /// Parses TOML text; `file` names it in errors. Relative paths stay as written.
    pub fn parse(file: &str, text: &str) -> Result<ConfigFile> {
        let err = |e: toml::de::Error| toml_error(file, text, &e);
        let mut doc = DeTable::parse(text).map_err(err)?;
        let tables = match doc.get_ref().get(TABLES_KEY).map(|v| v.get_ref()) {
            Some(DeValue::Array(a)) if a.iter().all(|v| v.get_ref().is_table()) => {
                let a = a.clone();
                doc.get_mut().remove(TABLES_KEY);
                a.iter()
                    .enumerate()
                    .map(|(i, t)| AdapterTable::parse(file, text, i + 1, t))
                    .collect::<Result<Vec<_>>>()?
            }
            _ => Vec::new(),
        };
        let top = TrainArgs::deserialize(toml::de::Deserializer::from(doc)).map_err(err)?;
        Ok(ConfigFile { top, tables })
    }
}

impl AdapterTable {
    /// Table number `n` (1-based) of the file.
    fn parse(file: &str, text: &str, n: usize, value: &Spanned<DeValue>) -> Result<AdapterTable> {
        let at = |span: std::ops::Range<usize>, msg: String| Error::ConfigFile {
            file: file.to_string(),
            msg: format!("line {}: {msg}", line_of(text, span.start)),
        };
        let DeValue::Table(table) = value.get_ref() else {
            unreachable!("only tables are parsed as [[adapter]] tables")
        };
        let mut table = table.clone();
        let (name, line) = match table.remove_entry("name") {
            Some((k, v)) => match v.get_ref() {
                DeValue::String(s) => (s.to_string(), line_of(text, k.span().start)),
                _ => {
                    return Err(at(
                        v.span(),
                        format!("[[adapter]] {n}: name is not a string"),
                    ))
                }
            },
            None => {
                return Err(at(
                    value.span(),
                    format!("[[adapter]] {n} has no name (every table needs `name = \"...\"`)"),
                ))
            }
        };
        check_name(&name).map_err(|why| named_error((file, line), &name, why))?;
        if let Some((k, _)) = table
            .iter()
            .find(|(k, _)| SHARED_KEYS.contains(&k.get_ref().as_ref()))
        {
            return Err(at(
                k.span(),
                format!(
                    "[[adapter]] `{name}`: `{}` is a setting of the whole run, not of one \
                     adapter: set it at the top level or by its flag",
                    k.get_ref()
                ),
            ));
        }
        let value = Spanned::new(value.span(), DeValue::Table(table));
        let args =
            TrainArgs::deserialize(ValueDeserializer::from(value)).map_err(
                |e| match toml_error(file, text, &e) {
                    Error::ConfigFile { file, msg } => Error::ConfigFile {
                        file,
                        msg: format!("{msg} (in [[adapter]] `{name}`)"),
                    },
                    other => other,
                },
            )?;
        Ok(AdapterTable { name, line, args })
    }
}

/// An error about adapter `name`, whose table starts at `line` of `file`.
fn named_error((file, line): (&str, usize), name: &str, why: String) -> Error {
    Error::ConfigFile {
        file: file.to_string(),
        msg: format!("line {line}: [[adapter]] `{name}`: {why}"),
    }
}

/// Whether `name` is a safe folder name: 1 to 100 ASCII letters, digits, `.`, `_`, `-` and `+`,
/// not starting with `.` or `-`. The reason why not, otherwise.
pub(super) fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-+".contains(c);
    if name.is_empty() || name.len() > 100 {
        return Err(format!(
            "the name must have 1 to 100 characters, not {}",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|&c| !ok_char(c)) {
        return Err(format!(
            "the name has `{c}`: a name is a folder name, of letters, digits, `.`, `_`, `-` \
             and `+`"
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err("the name may not start with `.` or `-`".into());
    }
    Ok(())
}

/// An error about adapter `name` of the file `file` at `line` (duplicates, folders).
pub(super) fn table_error(file: &Path, line: usize, name: &str, why: String) -> Error {
    named_error((&file.display().to_string(), line), name, why)
}

/// `p` made absolute (against the current folder), for comparing output folders.
pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
