//! Keys of archived change-log segments (`archive/<file>/<start>-<end>`): what the agent that
//! stores them, the agent that replays them and the controller that removes the compacted ones
//! agree on. See `coffer_strategies::archive`.

/// The prefix of every archived segment's key.
pub const PREFIX: &str = "archive/";

/// The storage key of a segment of `file`, bytes `[start, end)`.
pub fn segment_key(file: &str, start: u64, end: u64) -> String {
    format!("{PREFIX}{file}/{start:012}-{end:012}")
}

/// The file and range a segment's key names (None for any other key).
pub fn parse_segment_key(key: &str) -> Option<(String, u64, u64)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (file, range) = rest.rsplit_once('/')?;
    let (a, b) = range.split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (!file.is_empty() && !file.contains('/') && a < b).then(|| (file.to_string(), a, b))
}

/// The segments of `keys` that a whole-file segment (one from byte 0) covers: what is left
/// once a file is compacted, to remove.
pub fn covered(keys: &[String]) -> Vec<String> {
    let segs: Vec<(String, u64, u64, &String)> = keys
        .iter()
        .filter_map(|k| parse_segment_key(k).map(|(f, a, b)| (f, a, b, k)))
        .collect();
    let mut out = vec![];
    for (f, a, b, k) in &segs {
        let whole = segs
            .iter()
            .filter(|(g, s, _, _)| g == f && *s == 0)
            .map(|(_, _, e, _)| *e)
            .max()
            .unwrap_or(0);
        if *b <= whole && !(*a == 0 && *b == whole) {
            out.push((*k).clone());
        }
    }
    out
}

/// How change files sort: by length, then by name (numbered names grow a digit past
/// `999999`).
pub fn file_order(a: &str, b: &str) -> std::cmp::Ordering {
    (a.len(), a).cmp(&(b.len(), b))
}

/// The segments of `keys` in files before `file`: what no restore from a backup whose position
/// is in `file` (or later) reads, left to remove once no kept backup is older.
pub fn before(keys: &[String], file: &str) -> Vec<String> {
    keys.iter()
        .filter(|k| parse_segment_key(k).is_some_and(|(f, _, _)| file_order(&f, file).is_lt()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_before_the_oldest_needed_one_are_left_to_remove() {
        let keys: Vec<String> = [
            segment_key("b.999999", 0, 100),
            segment_key("b.1000000", 0, 40),
            segment_key("b.000007", 0, 100),
            segment_key("b.000008", 0, 10),
            segment_key("b.000008", 10, 20),
            "b1.json".to_string(),
        ]
        .into();
        assert_eq!(
            before(&keys, "b.000008"),
            vec![segment_key("b.000007", 0, 100)]
        );
        assert_eq!(
            before(&keys, "b.1000000"),
            vec![
                segment_key("b.999999", 0, 100),
                segment_key("b.000007", 0, 100),
                segment_key("b.000008", 0, 10),
                segment_key("b.000008", 10, 20),
            ]
        );
        assert!(before(&keys, "b.000001").is_empty());
    }

    #[test]
    fn only_what_a_whole_file_covers_is_left_to_remove() {
        let keys: Vec<String> = [
            segment_key("b.000001", 0, 100),
            segment_key("b.000001", 100, 250),
            segment_key("b.000001", 0, 250),
            segment_key("b.000002", 0, 40),
            segment_key("b.000002", 40, 90),
            "b1.json".to_string(),
        ]
        .into();
        assert_eq!(
            covered(&keys),
            vec![
                segment_key("b.000001", 0, 100),
                segment_key("b.000001", 100, 250)
            ]
        );
    }
}
