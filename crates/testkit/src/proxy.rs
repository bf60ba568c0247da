//! A recording TCP proxy: what an attacker with a probe on the TPM bus sees.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use crate::free_port_pair;

/// Forwards `listen_port -> target_port` and `listen_port+1 -> target_port+1` (the swtpm
/// control channel), recording every byte of the data channel in both directions.
pub struct RecordingProxy {
    port: u16,
    log: Arc<Mutex<Vec<u8>>>,
    commands: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl RecordingProxy {
    /// Start a proxy in front of a swtpm listening on `target_port` (and `target_port + 1`).
    pub fn start(target_port: u16) -> RecordingProxy {
        let port = free_port_pair();
        let log = Arc::new(Mutex::new(Vec::new()));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        for (offset, record) in [(0u16, true), (1u16, false)] {
            let listener = TcpListener::bind(("127.0.0.1", port + offset)).unwrap();
            let log = log.clone();
            let commands = commands.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(client) = conn else { continue };
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port + offset)) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let rec = record.then(|| (log.clone(), commands.clone()));
                    pump(client, server, rec);
                }
            });
        }
        RecordingProxy {
            port,
            log,
            commands,
            stop,
        }
    }

    /// The proxy's data port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// TCTI string that goes through the proxy.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Every byte seen on the data channel so far, both directions, in arrival order.
    pub fn capture(&self) -> Vec<u8> {
        self.log.lock().unwrap().clone()
    }

    /// Forget what was captured so far.
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
        self.commands.lock().unwrap().clear();
    }

    /// The TPM command codes (TPM_CC) sent so far, in order, parsed from the 10-byte command
    /// headers of the client-to-TPM direction.
    pub fn command_codes(&self) -> Vec<u32> {
        let chunks = self.commands.lock().unwrap().clone();
        let stream: Vec<u8> = chunks.concat();
        let mut codes = Vec::new();
        let mut i = 0;
        while i + 10 <= stream.len() {
            let size =
                u32::from_be_bytes([stream[i + 2], stream[i + 3], stream[i + 4], stream[i + 5]])
                    as usize;
            let cc =
                u32::from_be_bytes([stream[i + 6], stream[i + 7], stream[i + 8], stream[i + 9]]);
            codes.push(cc);
            if size < 10 {
                break;
            }
            i += size;
        }
        codes
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loops.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = TcpStream::connect(("127.0.0.1", self.port + 1));
    }
}

type Recorders = (Arc<Mutex<Vec<u8>>>, Arc<Mutex<Vec<Vec<u8>>>>);

fn pump(client: TcpStream, server: TcpStream, rec: Option<Recorders>) {
    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let rec2 = rec.clone();
    thread::spawn(move || copy(client, server, rec, true));
    thread::spawn(move || copy(s2, c2, rec2, false));
}

fn copy(mut from: TcpStream, mut to: TcpStream, rec: Option<Recorders>, to_tpm: bool) {
    let mut buf = [0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((log, cmds)) = &rec {
            log.lock().unwrap().extend_from_slice(&buf[..n]);
            if to_tpm {
                cmds.lock().unwrap().push(buf[..n].to_vec());
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
