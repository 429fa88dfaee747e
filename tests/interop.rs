//! Interop: a client generated from `proto/crisis/v1/crisis.proto` by another
//! gRPC implementation (Python grpcio and grpcio-tools) uses the real
//! `crisisd serve` binary over a socket, as the README describes. The client
//! and its checks are `tests/interop/client.py`.
//!
//! Needs `python3` with `venv`, and PyPI the first time: the pinned packages
//! are installed into `target/tmp/interop-venv` and reused after that. A
//! missing Python or a failed install fails the test; it never skips.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Pinned Python packages (verified to install on Python 3.11). protobuf is
/// pinned too: the generated code checks its runtime version.
const PY_PACKAGES: &[(&str, &str)] = &[
    ("grpcio", "1.85.1"),
    ("grpcio-tools", "1.85.1"),
    ("protobuf", "7.36.2"),
];

const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
const PIP_TIMEOUT: Duration = Duration::from_secs(900);

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

fn describe(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion, killing it after `timeout`.
fn run(cmd: &mut Command, timeout: Duration, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start {cmd:?}: {e}"));
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let out = Output {
                    status: child.wait().expect("wait"),
                    stdout: stdout.join().unwrap_or_default(),
                    stderr: stderr.join().unwrap_or_default(),
                };
                panic!("{what}: timed out after {timeout:?}\n{}", describe(&out));
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("{what}: waiting: {e}"),
        }
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// The installed versions of PY_PACKAGES, in order, if the venv's Python runs.
fn installed_versions(python: &Path) -> Option<Vec<String>> {
    let names: Vec<String> = PY_PACKAGES.iter().map(|(n, _)| format!("{n:?}")).collect();
    let script = format!(
        "import importlib.metadata as m\nfor n in [{}]:\n    try:\n        print(m.version(n))\n    except m.PackageNotFoundError:\n        print('-')\n",
        names.join(", ")
    );
    let out = Command::new(python)
        .args(["-c", &script])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

/// A venv with the pinned packages, made or completed if needed. Panics
/// (fails the test) when Python, venv or pip cannot provide it.
fn ensure_venv() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-venv");
    let python = venv_python(&venv);
    let wanted: Vec<String> = PY_PACKAGES.iter().map(|(_, v)| v.to_string()).collect();
    let have = installed_versions(&python);
    if have.as_ref() == Some(&wanted) {
        return python;
    }
    if have.is_none() {
        // Missing or broken: make it anew.
        let _ = std::fs::remove_dir_all(&venv);
        let out = run(
            Command::new("python3").arg("-m").arg("venv").arg(&venv),
            Duration::from_secs(300),
            "python3 -m venv",
        );
        assert!(
            out.status.success(),
            "creating the Python virtualenv at {} failed (is python3 with venv installed?)\n{}",
            venv.display(),
            describe(&out)
        );
    }
    let pins: Vec<String> = PY_PACKAGES
        .iter()
        .map(|(n, v)| format!("{n}=={v}"))
        .collect();
    let out = run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--quiet",
            ])
            .args(&pins),
        PIP_TIMEOUT,
        "pip install",
    );
    assert!(
        out.status.success(),
        "pip install {} into {} failed (is PyPI reachable?)\n{}",
        pins.join(" "),
        venv.display(),
        describe(&out)
    );
    let have = installed_versions(&python);
    assert_eq!(
        have.as_ref(),
        Some(&wanted),
        "after pip install, the venv at {} does not hold {}",
        venv.display(),
        pins.join(" ")
    );
    python
}

fn fresh_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let dir = std::env::temp_dir().join(format!("crisisd-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// The running `crisisd serve`: killed, and its folder removed, when dropped
/// (the folder is kept when the test failed).
struct Server {
    child: Child,
    dir: PathBuf,
    addr: String,
    stdout: Arc<Mutex<String>>,
}

impl Server {
    fn start() -> Server {
        let dir = fresh_dir("interop");
        let stderr = File::create(dir.join("server.stderr")).expect("server.stderr");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crisisd"));
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        // The server rejects unknown CRISISD_* variables, and a config or
        // tokens from the caller's environment would change what it runs.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CRISISD_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("CRISISD_DATA_DIR", &dir);
        let mut child = cmd.spawn().expect("starting crisisd serve");
        let pipe = child.stdout.take().expect("stdout");
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<String>();
        {
            // Keep reading after the address line, so the console pager's
            // output never fills the pipe.
            let stdout = stdout.clone();
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    stdout.lock().unwrap().push_str(&format!("{line}\n"));
                    if let Some((_, addr)) = line.split_once(" listening on ") {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            });
        }
        let mut server = Server {
            child,
            dir,
            addr: String::new(),
            stdout,
        };
        match rx.recv_timeout(SERVER_START_TIMEOUT) {
            Ok(addr) => server.addr = addr,
            Err(_) => panic!(
                "crisisd serve printed no 'listening on' line within {SERVER_START_TIMEOUT:?}\n{}",
                server.output()
            ),
        }
        server
    }

    /// What the server printed so far.
    fn output(&self) -> String {
        let stderr = std::fs::read_to_string(self.dir.join("server.stderr")).unwrap_or_default();
        format!(
            "--- server stdout ---\n{}--- server stderr ---\n{stderr}",
            self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("kept the server's folder: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[test]
fn python_grpc_client_uses_the_service() {
    let python = ensure_venv();
    let server = Server::start();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run(
        Command::new(&python)
            .arg(root.join("tests").join("interop").join("client.py"))
            .arg("--server")
            .arg(&server.addr)
            .arg("--proto-dir")
            .arg(root.join("proto"))
            .arg("--out-dir")
            .arg(server.dir.join("stubs"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            // A proxy from the environment must not capture a loopback call.
            .env("no_grpc_proxy", "127.0.0.1,localhost")
            .env_remove("PYTHONPATH"),
        CLIENT_TIMEOUT,
        "client.py",
    );
    assert!(
        out.status.success(),
        "the Python client failed\n{}\n{}",
        describe(&out),
        server.output()
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
}
