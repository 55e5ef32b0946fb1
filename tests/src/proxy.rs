//! A TCP proxy in front of nats-server that can cut one client's link: it reads the client's
//! `CONNECT {...}` line and, while a cut matches it (e.g. an instance id inside the agent's
//! connection name), drops that connection and every reconnect attempt. Runs on its own thread.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Shared {
    cuts: HashSet<String>,
    /// Live connections: the CONNECT line and how to end it.
    conns: Vec<(String, CancellationToken)>,
}

pub struct NatsProxy {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
}

impl NatsProxy {
    pub fn start(port: u16, upstream: u16) -> NatsProxy {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = CancellationToken::new();
        let (s2, stop2) = (shared.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
                ready_tx.send(()).unwrap();
                loop {
                    tokio::select! {
                        _ = stop2.cancelled() => return,
                        a = l.accept() => {
                            if let Ok((c, _)) = a {
                                tokio::spawn(serve(c, upstream, s2.clone(), stop2.clone()));
                            }
                        }
                    }
                }
            });
        });
        ready_rx.recv().unwrap();
        NatsProxy { port, shared, stop }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Drops every connection whose CONNECT line contains `needle`, and refuses them until
    /// [`NatsProxy::heal`].
    pub fn cut(&self, needle: &str) {
        let mut s = self.shared.lock().unwrap();
        s.cuts.insert(needle.to_string());
        for (line, tok) in &s.conns {
            if line.contains(needle) {
                tok.cancel();
            }
        }
    }

    pub fn heal(&self, needle: &str) {
        self.shared.lock().unwrap().cuts.remove(needle);
    }
}

impl Drop for NatsProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(
    client: TcpStream,
    upstream: u16,
    shared: Arc<Mutex<Shared>>,
    stop: CancellationToken,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let tok = stop.child_token();
    // Server → client flows freely (INFO first); client → server is read line by line until
    // the CONNECT line has been seen.
    let t2 = tok.clone();
    let down = tokio::spawn(async move {
        tokio::select! {
            _ = t2.cancelled() => {}
            _ = tokio::io::copy(&mut sr, &mut cw) => {}
        }
        let _ = cw.shutdown().await;
    });
    let mut cr = BufReader::new(cr);
    let mut line = String::new();
    loop {
        line.clear();
        match cr.read_line(&mut line).await {
            Ok(0) | Err(_) => {
                tok.cancel();
                let _ = down.await;
                return;
            }
            Ok(_) => {}
        }
        if sw.write_all(line.as_bytes()).await.is_err() {
            tok.cancel();
            let _ = down.await;
            return;
        }
        if line.starts_with("CONNECT") {
            break;
        }
    }
    {
        let mut s = shared.lock().unwrap();
        if s.cuts.iter().any(|c| line.contains(c.as_str())) {
            tok.cancel();
        }
        s.conns.retain(|(_, t)| !t.is_cancelled());
        s.conns.push((line.clone(), tok.clone()));
    }
    tokio::select! {
        _ = tok.cancelled() => {}
        _ = tokio::io::copy(&mut cr, &mut sw) => {}
    }
    tok.cancel();
    let _ = sw.shutdown().await;
    let _ = down.await;
}
