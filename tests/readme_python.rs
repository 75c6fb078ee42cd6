//! The README's Python example runs as written: it is taken from the README, pointed at a
//! server started here (the one change: the address), and must print the `subscribed`
//! reply and a BTC-USD snapshot or tick from the simulator.
//!
//! Needs a Python with `websockets`: `tools/test.sh` makes one in `target/py` and names it
//! in `TG_TEST_PYTHON`. Without it the test fails and says so; it never skips.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;

/// The first ```python block of the README.
fn readme_python() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("```python\n").expect("README has a ```python block") + "```python\n".len();
    let end = start + readme[start..].find("```").expect("the python block ends");
    readme[start..end].to_string()
}

fn python() -> String {
    let py = std::env::var("TG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import websockets"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{py} cannot import websockets: run the suite with tools/test.sh (it makes target/py), \
         or set TG_TEST_PYTHON to a Python that has it"
    );
    py
}

#[test]
fn the_readme_python_example_streams_ticks() {
    let script = readme_python();
    assert!(
        script.contains("127.0.0.1:8080"),
        "the example connects to the demo's address"
    );
    let py = python();

    let srv = start(test_config(1));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    tickgate::rt::sim::spawn(
        srv.handle.shared.clone(),
        &["BTC-USD".to_string()],
        50,
        stop.clone(),
    )
    .unwrap();
    let script = script.replace("127.0.0.1:8080", &srv.addr().to_string());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stream.py");
    std::fs::write(&path, script).unwrap();

    let mut child = Command::new(&py)
        .arg(&path)
        .arg(srv.token("py"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut subscribed = false;
    let mut data = false;
    // Generous: the bound only stops a broken example from hanging the suite.
    while !(subscribed && data) {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                subscribed |= v["type"] == "subscribed" && v["symbols"][0] == "BTC-USD";
                data |= (v["type"] == "snapshot" || v["type"] == "tick") && v["s"] == "BTC-USD";
                seen.push(line);
            }
            Err(_) => break,
        }
    }
    let _ = child.kill();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let out = child.wait_with_output().unwrap();
    assert!(
        subscribed && data,
        "the example printed {seen:?}; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
