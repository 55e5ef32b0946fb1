//! Typed request bodies: serde types (unknown keys refused where Trove refuses them) read through
//! `serde_path_to_error`, whose errors are rewritten into Trove's jsonschema texts
//! (`instance['volume'] 'size' is a required property`), and the value types Trove's bodies use.

use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use serde_path_to_error::{Path, Segment};

use coffer_proto::v1;

use super::ApiError;

/// Reads a request body (already checked to be a JSON object) as `T`.
pub fn typed<T: DeserializeOwned>(body: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(body))
        .map_err(|e| ApiError::validation(trove_text(e.path(), &e.inner().to_string())))
}

/// Reads a request's bytes (a JSON object, [`super::parse_body`]) as `T`.
pub fn body_as<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    typed(super::parse_body(bytes)?)
}

/// `instance['volume']['size']`: the path as Trove's messages show it (list indexes left out).
fn show(path: &Path) -> String {
    let mut out = String::new();
    for seg in path.iter() {
        if let Segment::Map { key } | Segment::Enum { variant: key } = seg {
            if out.is_empty() {
                out.push_str(key);
            } else {
                out.push_str(&format!("['{key}']"));
            }
        }
    }
    out
}

/// One of serde's messages in Trove's words.
fn trove_text(path: &Path, msg: &str) -> String {
    let at = show(path);
    let prefix = if at.is_empty() {
        String::new()
    } else {
        format!("{at} ")
    };
    let quoted = |m: &str| m.split('`').nth(1).unwrap_or_default().to_string();
    if msg.starts_with("unknown field") {
        // The path ends at the unexpected key itself; Trove names the object that holds it.
        let key = quoted(msg);
        let holder = at
            .strip_suffix(&format!("['{key}']"))
            .or_else(|| at.strip_suffix(key.as_str()))
            .unwrap_or(&at);
        let holder = if holder.is_empty() {
            String::new()
        } else {
            format!("{holder} ")
        };
        return format!("{holder}Additional properties are not allowed ('{key}' was unexpected)");
    }
    if msg.starts_with("invalid length") && msg.contains("expected struct") {
        return format!("{at} is not of type 'object'");
    }
    if msg.starts_with("missing field") {
        return format!("{prefix}'{}' is a required property", quoted(msg));
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let expected = rest.split(", expected ").nth(1).unwrap_or_default();
        let kind = match expected {
            e if e.starts_with('\'') => e.to_string(),
            "a string" => "'string'".into(),
            "a sequence" => "'array'".into(),
            "a boolean" => "'boolean'".into(),
            e if e.starts_with("struct") || e.starts_with("a map") => "'object'".into(),
            e if e.starts_with('i') || e.starts_with('u') => "'integer'".into(),
            e => format!("'{e}'"),
        };
        return format!("{at} is not of type {kind}");
    }
    format!("{prefix}{msg}")
}

/// An id, or an href whose last segment is the id; a number is taken as its digits.
#[derive(Debug, Clone, PartialEq)]
pub struct Id(pub String);

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Id;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("'string', 'integer'")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Id, E> {
                match s.rsplit('/').next().unwrap_or(s) {
                    "" => Err(E::custom(format!("'{s}' is not an id or an href"))),
                    id => Ok(Id(id.to_string())),
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Id, E> {
                Ok(Id(n.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Id, E> {
                Ok(Id(n.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A positive integer, given as a number or as its digits (python-troveclient sends both).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Positive(pub i64);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Positive;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("'integer'")
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Positive, E> {
                if n >= 1 {
                    Ok(Positive(n))
                } else {
                    Err(E::custom(format!("{n} is not a positive integer")))
                }
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Positive, E> {
                i64::try_from(n)
                    .map_err(|_| E::custom(format!("{n} is not a positive integer")))
                    .and_then(|n| self.visit_i64(n))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Positive, E> {
                Err(E::custom(format!("{n} is not a positive integer")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Positive, E> {
                s.parse::<i64>()
                    .map_err(|_| E::custom(format!("'{s}' is not a positive integer")))
                    .and_then(|n| self.visit_i64(n))
            }
        }
        d.deserialize_any(V)
    }
}

/// Trove's `0`/`1` flags (`incremental`, a log's `enable`): integers, as Trove's schemas have
/// them (`true` is refused).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroOne(pub bool);

impl<'de> Deserialize<'de> for ZeroOne {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(ZeroOne(false)),
            Value::Number(n) if n.as_u64() == Some(0) => Ok(ZeroOne(false)),
            Value::Number(n) if n.as_u64() == Some(1) => Ok(ZeroOne(true)),
            v => Err(de::Error::custom(format!("{v} is not one of [0, 1]"))),
        }
    }
}

/// `{"name": ...}` items (a user's databases).
#[derive(Debug, Deserialize)]
pub struct NameRef {
    pub name: String,
}

/// `{"id": ...}` items (an instance's modules).
#[derive(Debug, Deserialize)]
pub struct IdRef {
    pub id: Id,
}

/// `{"size": ...}` (an instance's or enrolment token's volume).
#[derive(Debug, Deserialize)]
pub struct Volume {
    pub size: Positive,
}

/// `{"type": ..., "version": ...}` (a group's, module's or enrolment token's datastore).
#[derive(Debug, Deserialize)]
pub struct DatastoreReq {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub version: Option<String>,
}

/// For `#[serde(default, deserialize_with = "present")]`: `Some` whenever the key is given, even
/// as `null` (with `T = Option<_>`, `null` is `Some(None)` and a missing key `None`).
pub fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A database of a `databases` list.
#[derive(Debug, Deserialize)]
pub struct DatabaseReq {
    pub name: String,
    pub character_set: Option<String>,
    pub collate: Option<String>,
}

/// A user of a `users` list.
#[derive(Debug, Deserialize)]
pub struct UserReq {
    pub name: String,
    pub password: String,
    pub host: Option<String>,
    pub databases: Option<Vec<NameRef>>,
}

/// A database or user name as the agents take it.
pub fn check_name(kind: &str, name: &str, max: usize) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > max {
        return Err(ApiError::validation(format!(
            "{kind} name '{name}' must be 1 to {max} characters"
        )));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.$".contains(c))
    {
        return Err(ApiError::validation(format!(
            "{kind} name '{name}' may only contain letters, digits, '_', '-', '.' and '$'"
        )));
    }
    Ok(())
}

pub fn check_host(host: &str) -> Result<(), ApiError> {
    if host.is_empty()
        || host.len() > 255
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".%_:-/".contains(c))
    {
        return Err(ApiError::validation(format!(
            "host '{host}' is not a host name, address or pattern"
        )));
    }
    Ok(())
}

pub fn check_password(p: &str) -> Result<(), ApiError> {
    if p.is_empty() || p.len() > 128 || p.chars().any(|c| c.is_control()) {
        return Err(ApiError::validation(
            "password must be 1 to 128 characters without control characters",
        ));
    }
    Ok(())
}

/// A list that must hold 1 to [`super::MAX_ITEMS_PER_REQUEST`] items.
pub fn some_of<T>(what: &str, items: Vec<T>) -> Result<Vec<T>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::validation(format!("'{what}' must not be empty")));
    }
    super::check_count(&format!("'{what}'"), items.len())?;
    Ok(items)
}

/// A checked database (`path` names the list in errors).
pub fn database(d: DatabaseReq, path: &str) -> Result<v1::Database, ApiError> {
    check_name("database", &d.name, 64)?;
    let cs = d.character_set.unwrap_or_default();
    let co = d.collate.unwrap_or_default();
    for (what, v) in [("character_set", &cs), ("collate", &co)] {
        if v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(ApiError::validation(format!(
                "{path} {what} '{v}' is not valid"
            )));
        }
    }
    Ok(v1::Database {
        name: d.name,
        character_set: cs,
        collate: co,
    })
}

/// A checked user, its password still in the clear (host `%` unless given).
pub fn user(u: UserReq) -> Result<v1::User, ApiError> {
    check_name("user", &u.name, 80)?;
    check_password(&u.password)?;
    let host = u.host.unwrap_or_else(|| "%".into());
    check_host(&host)?;
    let databases: Vec<String> = u
        .databases
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.name)
        .collect();
    super::check_count("users['databases']", databases.len())?;
    for d in &databases {
        check_name("database", d, 64)?;
    }
    Ok(v1::User {
        name: u.name,
        password: u.password,
        host,
        databases,
        password_sealed: Vec::new(),
    })
}
