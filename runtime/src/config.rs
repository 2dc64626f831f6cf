//! What both binaries' configurations share: the optional TOML file, the
//! precedence (a flag beats the file, the file beats the default: [`pick!`](crate::pick))
//! and the errors a configuration is refused with. Each binary lists its own
//! knobs and validates them once, into a `Config` that cannot be built in
//! an invalid state.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has an unknown key or a wrong type.
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    /// A value is out of its range or contradicts another.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The TOML file at `path`, or every key absent without one.
pub fn read_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
}

/// `pick!(args, file, field, default)`: the flag `args.field` if given,
/// else the file's `file.field`, else `default`.
#[macro_export]
macro_rules! pick {
    ($args:ident, $file:ident, $field:ident, $default:expr) => {
        $args.$field.or($file.$field).unwrap_or($default)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        shards: Option<usize>,
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("rayflux-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        std::fs::write(&path, "shards = 3\n").unwrap();
        let file: File = read_file(Some(&path)).unwrap();
        let none = File::default();
        let flags = File { shards: Some(5) };
        assert_eq!(pick!(flags, file, shards, 1), 5);
        assert_eq!(pick!(none, file, shards, 1), 3);
        let empty: File = read_file(None).unwrap();
        assert_eq!(pick!(none, empty, shards, 1), 1);
        std::fs::write(&path, "shard = 3\n").unwrap();
        assert!(matches!(read_file::<File>(Some(&path)), Err(ConfigError::Parse { .. })));
        assert!(matches!(read_file::<File>(Some(&dir.join("none.toml"))), Err(ConfigError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
