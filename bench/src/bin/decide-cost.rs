//! CPU cost of `decide` for one POP on a large synthetic state: N POPs,
//! each exporting the same S services (one ready endpoint each), every POP
//! online, plus an RTT row from the deciding POP to every other. This is
//! the per-session work a hub node does for each applied change during
//! the fan-out benchmark's export phase.
//!
//! ```sh
//! cargo build --release -p switchyard-bench --bin decide-cost
//! target/release/decide-cost --pops 1000 --services 20
//! ```

use std::time::Instant;

use clap::Parser;
use prost::Message;
use switchyard_bench::{exports::sim_export, proc::rss_kib};
use switchyard_hub::state::State;
use switchyard_proto::pb::{self, command::Kind};

#[derive(Parser)]
struct Args {
    /// POPs in the state.
    #[arg(long, default_value_t = 1000)]
    pops: usize,
    /// Services every POP exports.
    #[arg(long, default_value_t = 20)]
    services: usize,
    /// Views computed (for different POPs, round robin) per measurement.
    #[arg(long, default_value_t = 300)]
    views: usize,
}

fn cmd(kind: Kind) -> pb::Command {
    pb::Command { kind: Some(kind) }
}

fn apply(s: &mut State, index: &mut u64, c: pb::Command) -> anyhow::Result<()> {
    *index += 1;
    let r = s.apply(*index, &c);
    anyhow::ensure!(r.error == 0, "command {index}: {}", r.message);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut s = State::default();
    let mut i = 0;
    apply(
        &mut s,
        &mut i,
        cmd(Kind::InitFederation(pb::InitFederation {
            federation: Some(pb::Federation {
                domain: "bench.local".into(),
                ca_cert_pem: "CERT".into(),
                ca_key_pem: "KEY".into(),
            }),
        })),
    )?;
    let name = |p: usize| format!("sim-{p:04}");
    for p in 0..args.pops {
        apply(
            &mut s,
            &mut i,
            cmd(Kind::UpsertPop(pb::UpsertPop {
                pop: Some(pb::Pop {
                    name: name(p),
                    ..Default::default()
                }),
                create_only: false,
                now_ms: 1,
            })),
        )?;
    }
    let t = Instant::now();
    for p in 0..args.pops {
        let upserts = (0..args.services)
            .map(|k| sim_export("sim", &format!("svc-{k}")))
            .collect();
        apply(
            &mut s,
            &mut i,
            cmd(Kind::ApplyExports(pb::ApplyExports {
                pop: name(p),
                seq: 1,
                upserts,
                withdrawals: Vec::new(),
                full: true,
            })),
        )?;
        apply(
            &mut s,
            &mut i,
            cmd(Kind::SetPopLiveness(pb::SetPopLiveness {
                pop: name(p),
                state: pb::PopLiveness::Online as i32,
                reason: "bench".into(),
                now_ms: 1,
                session: String::new(),
            })),
        )?;
    }
    let apply_s = t.elapsed().as_secs_f64();
    for p in 1..args.pops {
        apply(
            &mut s,
            &mut i,
            cmd(Kind::ReportRtt(pb::ReportRtt {
                from_pop: name(0),
                to_pop: name(p),
                rtt_us: 1000 + p as u64,
            })),
        )?;
    }
    println!(
        "state: {} POPs x {} services, {} exports, {} VIPs ({} commands; export sets applied in {:.3} s)",
        args.pops,
        args.services,
        s.exports.len(),
        s.vips.len(),
        i,
        apply_s
    );
    {
        // What a hub node holds per session: one view (the session's last
        // sent and the board's last computed share it).
        let before = rss_kib(std::process::id())?;
        let prepared = switchyard_hub::decide::Prepared::new(&s);
        let held: Vec<_> = (0..args.views)
            .map(|v| prepared.view_from(&name(v % args.pops), None))
            .collect();
        let after = rss_kib(std::process::id())?;
        let wire: usize = held.iter().map(|v| v.to_pb().encoded_len()).sum();
        println!(
            "memory: {:.0} KiB RSS per view held ({} views), {:.0} KiB encoded",
            after.saturating_sub(before) as f64 / held.len() as f64,
            held.len(),
            wire as f64 / 1024.0 / held.len() as f64
        );
    }
    for round in 0..3 {
        let t = Instant::now();
        let mut targets = 0;
        for v in 0..args.views {
            let view = switchyard_hub::decide::decide(&s, &name(v % args.pops));
            targets += view
                .services
                .iter()
                .flat_map(|s| &s.tiers)
                .map(|t| t.targets.len())
                .sum::<usize>();
        }
        let per = t.elapsed().as_secs_f64() / args.views as f64;
        let t = Instant::now();
        let prepared = switchyard_hub::decide::Prepared::new(&s);
        let prepare = t.elapsed().as_secs_f64();
        for v in 0..args.views {
            std::hint::black_box(prepared.view(&name(v % args.pops)));
        }
        let shared = (t.elapsed().as_secs_f64() - prepare) / args.views as f64;
        // The pass a hub node runs after one service's export changed:
        // every view rebuilt from the previous one (see `Prepared::view_from`).
        let views: Vec<_> = (0..args.views)
            .map(|v| prepared.view_from(&name(v % args.pops), None))
            .collect();
        let t = Instant::now();
        for (v, prev) in views.iter().enumerate() {
            std::hint::black_box(prepared.view_from(&name(v % args.pops), Some(prev)));
        }
        let reused = t.elapsed().as_secs_f64() / args.views as f64;
        println!(
            "round {round}: decide {:.1} us per view ({} targets per view on average); \
             shared preparation {:.1} us once, then {:.1} us per view; \
             {:.1} us per view from an unchanged previous one",
            per * 1e6,
            targets / args.views,
            prepare * 1e6,
            shared * 1e6,
            reused * 1e6
        );
    }
    Ok(())
}
