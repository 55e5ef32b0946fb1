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

#[cfg(test)]
mod tests {
    use super::*;

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
