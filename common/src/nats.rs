//! NATS server lists: `nats_url` may name several servers of a cluster, comma-separated
//! (`nats://n1:4222,nats://n2:4222,nats://n3:4222`); the client connects to one and moves to
//! another when it goes away.

/// The servers `urls` names, in order.
pub fn servers(urls: &str) -> std::io::Result<Vec<async_nats::ServerAddr>> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        return Err(bad("no NATS server named (nats_url is empty)".into()));
    }
    list.into_iter()
        .map(|u| {
            u.parse()
                .map_err(|e| bad(format!("'{u}' is not a NATS server URL: {e}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_several_servers() {
        assert_eq!(servers("nats://127.0.0.1:4222").unwrap().len(), 1);
        let three = servers("nats://a:1, nats://b:2,nats://c:3").unwrap();
        assert_eq!(three.len(), 3);
        assert_eq!(three[1].host(), "b");
        assert_eq!(three[2].port(), 3);
        assert!(servers(" , ").is_err());
        let e = servers("nats://a:1,http://b:x").unwrap_err().to_string();
        assert!(e.contains("http://b:x"), "{e}");
    }
}
