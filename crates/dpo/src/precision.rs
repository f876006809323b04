//! The precision of a run's passes in its saved settings: `engine::kernels::Precision` by its name
//! (`"f32"`, `"bf16"`), the name the `--precision` flag takes. Settings written before the key existed
//! read as f32, the precision every run had then.

use engine::kernels::Precision;
use serde::{Deserialize, Deserializer, Serializer};

/// `#[serde(with = "crate::precision::by_name", default)]` on a [`Precision`] field.
pub mod by_name {
    use super::*;

    pub fn serialize<S: Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(p.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Precision, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Settings {
        #[serde(with = "by_name", default)]
        precision: Precision,
    }

    #[test]
    fn a_precision_is_saved_by_name_and_defaults_to_f32() {
        let text = toml::to_string(&Settings { precision: Precision::Bf16 }).unwrap();
        assert_eq!(text.trim(), "precision = \"bf16\"");
        assert_eq!(toml::from_str::<Settings>(&text).unwrap().precision, Precision::Bf16);
        assert_eq!(toml::from_str::<Settings>("").unwrap().precision, Precision::F32);
        let e = toml::from_str::<Settings>("precision = \"fp16\"").unwrap_err().to_string();
        assert!(e.contains("unknown precision `fp16`"), "{e}");
    }
}
