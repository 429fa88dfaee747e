//! The real `crisisd serve` binary as a child process: its output captured
//! line by line, its gRPC address read from the "listening on" line, and
//! killed if a test fails before stopping it.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Serve {
    pub child: Child,
    pub addr: String,
    pub out: Arc<Mutex<String>>,
    pub err: Arc<Mutex<String>>,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(r: impl Read + Send + 'static, into: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap_or_else(|e| e.into_inner());
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Serve {
    /// Spawns `cmd` (a `crisisd serve` command) and waits until it listens.
    pub fn spawn(mut cmd: Command) -> Serve {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn crisisd serve");
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        drain(child.stdout.take().expect("stdout"), out.clone());
        drain(child.stderr.take().expect("stderr"), err.clone());
        let mut s = Serve {
            child,
            addr: String::new(),
            out,
            err,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        s.addr = loop {
            let text = s.stdout();
            if let Some(a) = text.lines().find_map(|l| {
                l.split_once(" listening on ")
                    .map(|(_, a)| a.trim().to_string())
            }) {
                break a;
            }
            assert!(
                Instant::now() < deadline,
                "server did not start:\n{text}{}",
                s.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        s
    }

    pub fn stdout(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Everything it printed, stdout then stderr.
    pub fn output(&self) -> String {
        format!("{}\n{}", self.stdout(), self.stderr())
    }
}

/// A port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One HTTP/1.1 request to 127.0.0.1:port; the response body, if any.
pub fn http(port: u16, method: &str, path: &str) -> Option<String> {
    http_with(port, method, path, &[], "")
}

/// One HTTP/1.1 request with extra headers and a body; the response body.
pub fn http_with(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}
