//! Enrolment throughput against the real `devid-server` binary (`cargo bench -p devid-server
//! --bench enrolment`): 3 runs of 200 sequential enrolments with soft keys (key creation
//! outside the clock; CSR signing, HTTPS, proof of possession, certificate issue and the
//! durable commit inside). Prints a Markdown table with the median.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::Server;
use devid_admin_client::AdminClient;
use devid_enroll::{build_csr_with_keystore, enroll};
use devid_keystore::soft::SoftKeystore;
use devid_proto::TokenCreateRequest;

const RUNS: usize = 3;
const PER_RUN: usize = 200;

fn main() {
    let s = Server::start();
    let admin = AdminClient::from_data_dir(&s.dir, None).unwrap();
    let mut rates = Vec::new();
    println!("| run | enrolments | per second |\n|---|---|---|");
    for run in 0..RUNS {
        let mut work = Vec::with_capacity(PER_RUN);
        for i in 0..PER_RUN {
            let dir = s.tmp.path().join(format!("k-{run}-{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let ks = SoftKeystore::create(&dir).unwrap();
            let token = admin
                .create_token(&TokenCreateRequest::default())
                .unwrap()
                .token;
            work.push((ks, token));
        }
        let start = Instant::now();
        for (i, (ks, token)) in work.iter().enumerate() {
            let id = format!("bench-{run}-{i}");
            let csr = build_csr_with_keystore(ks, Some(&id)).unwrap();
            enroll(&s.url, token, &s.pin, &csr, Some(&id)).unwrap();
        }
        let rate = PER_RUN as f64 / start.elapsed().as_secs_f64();
        println!("| {run} | {PER_RUN} | {rate:.1} |");
        rates.push(rate);
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let median = rates[RUNS / 2];
    assert_eq!(
        s.devices().len(),
        RUNS * PER_RUN,
        "every enrolment was recorded"
    );
    println!("\nmedian enrolments/second (soft keys, one client): {median:.1}");
}
