//! The views of every uplink session on one hub node, computed together.
//!
//! Every session needs `decide(state, its POP)` after each applied change.
//! Computing them one session at a time repeats the part of `decide` that
//! is the same for every POP (each POP's eligibility, each service's
//! exporters) once per session; with a thousand POPs exporting the same
//! services that repeated part was almost all of the work. Here one task
//! per node gathers it once ([`Prepared`]) and derives each due session's
//! view from it, in chunks so the state's read lock is never held for
//! long, and outside every session's driver so a slow pass never delays
//! heartbeats. Changes applied during a pass coalesce into the next one.
//! Each seat keeps its last view, and the next one reuses its services
//! whose inputs did not move (`Prepared::view_from`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{watch, Notify};

use crate::{
    decide::{Prepared, View},
    metrics,
    node::Hub,
};

/// Views computed under one hold of the state's read lock: bounds how long
/// a writer (the Raft apply) can wait behind a pass, at about 0.4 ms per
/// view built from scratch for a thousand POPs exporting twenty services
/// each (~45 us when only one service changed and the rest are reused).
const VIEWS_PER_LOCK: usize = 32;

/// A session's place at the board.
struct Seat {
    pop: String,
    tx: watch::Sender<Option<Arc<View>>>,
    /// Applied index the last view was computed at; 0: never.
    computed_at: u64,
    /// Epoch of the last view sent.
    sent_epoch: u64,
    /// The last view computed: the next one reuses its unchanged services.
    last: Option<Arc<View>>,
}

/// The sessions whose views this node computes.
#[derive(Default)]
pub(crate) struct ViewBoard {
    seats: Mutex<HashMap<u64, Seat>>,
    /// A seat was added: run a pass even if nothing was applied.
    wake: Notify,
}

impl ViewBoard {
    /// Registers session `session_id` of `pop`; its views (newest wins)
    /// arrive on the returned receiver, the first one on the next pass.
    /// The seat is dropped once the receiver is.
    pub(crate) fn join(&self, session_id: u64, pop: &str) -> watch::Receiver<Option<Arc<View>>> {
        let (tx, rx) = watch::channel(None);
        if let Ok(mut seats) = self.seats.lock() {
            seats.insert(
                session_id,
                Seat {
                    pop: pop.to_string(),
                    tx,
                    computed_at: 0,
                    sent_epoch: 0,
                    last: None,
                },
            );
        }
        self.wake.notify_one();
        rx
    }

    /// Seats whose view is older than `applied` (dropping the seats whose
    /// session is gone), as (session id, POP, last view computed).
    fn due(&self, applied: u64) -> Vec<Due> {
        let Ok(mut seats) = self.seats.lock() else {
            return Vec::new();
        };
        seats.retain(|_, s| !s.tx.is_closed());
        seats
            .iter()
            .filter(|(_, s)| s.computed_at == 0 || s.computed_at < applied)
            .map(|(id, s)| Due {
                id: *id,
                pop: s.pop.clone(),
                last: s.last.clone(),
            })
            .collect()
    }

    /// Hands `view` (computed at `applied`) to session `id` if its epoch
    /// moved.
    fn deliver(&self, id: u64, applied: u64, view: View) {
        let Ok(mut seats) = self.seats.lock() else {
            return;
        };
        let Some(seat) = seats.get_mut(&id) else {
            return;
        };
        seat.computed_at = applied.max(1);
        let view = Arc::new(view);
        seat.last = Some(view.clone());
        if view.epoch > seat.sent_epoch || seat.sent_epoch == 0 {
            seat.sent_epoch = view.epoch;
            let _ = seat.tx.send(Some(view));
        }
    }
}

/// A seat whose view is due.
#[derive(Debug, Clone, PartialEq)]
struct Due {
    id: u64,
    pop: String,
    last: Option<Arc<View>>,
}

/// Runs passes until `applied` closes (the node is stopping): after every
/// applied change, and whenever a session joins.
pub(crate) async fn run(hub: Hub, board: Arc<ViewBoard>, mut applied: watch::Receiver<u64>) {
    loop {
        let at = *applied.borrow_and_update();
        let due = board.due(at);
        let started = tokio::time::Instant::now();
        for chunk in due.chunks(VIEWS_PER_LOCK) {
            // CPU work off the async workers, so the drivers' heartbeats
            // and the detectors keep running during a long pass.
            let (h, seats) = (hub.clone(), chunk.to_vec());
            let views = tokio::task::spawn_blocking(move || {
                h.local(|s| {
                    let prepared = Prepared::new(s);
                    seats
                        .iter()
                        .map(|d| (d.id, prepared.view_from(&d.pop, d.last.as_deref())))
                        .collect::<Vec<_>>()
                })
            })
            .await;
            let Ok(views) = views else {
                // The pool is shutting down with the runtime.
                return;
            };
            for (id, view) in views {
                board.deliver(id, at, view);
            }
        }
        if !due.is_empty() {
            ::metrics::histogram!(metrics::VIEW_PASS).record(started.elapsed().as_secs_f64());
            ::metrics::counter!(metrics::VIEWS_COMPUTED).increment(due.len() as u64);
        }
        tokio::select! {
            r = applied.changed() => if r.is_err() { return },
            _ = board.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::pb;

    fn view(pop: &str, epoch: u64) -> View {
        View::from_pb(&pb::PopView {
            pop: pop.into(),
            epoch,
            ..Default::default()
        })
    }

    fn due_pops(board: &ViewBoard, applied: u64) -> Vec<(u64, String)> {
        board
            .due(applied)
            .into_iter()
            .map(|d| (d.id, d.pop))
            .collect()
    }

    #[test]
    fn a_new_seat_is_due_then_only_after_the_applied_index_moves() {
        let board = ViewBoard::default();
        let mut rx = board.join(1, "a");
        assert_eq!(due_pops(&board, 10), vec![(1, "a".to_string())]);
        board.deliver(1, 10, view("a", 7));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().epoch, 7);
        assert!(board.due(10).is_empty(), "computed at 10 already");
        assert_eq!(board.due(11).len(), 1);
    }

    #[test]
    fn a_view_whose_epoch_did_not_move_is_not_sent_again() {
        let board = ViewBoard::default();
        let mut rx = board.join(1, "a");
        board.deliver(1, 10, view("a", 7));
        rx.borrow_and_update();
        board.deliver(1, 11, view("a", 7));
        assert!(!rx.has_changed().unwrap());
        board.deliver(1, 12, view("a", 9));
        assert_eq!(rx.borrow_and_update().as_ref().unwrap().epoch, 9);
    }

    #[test]
    fn a_seat_goes_when_its_session_drops_the_receiver() {
        let board = ViewBoard::default();
        let rx = board.join(1, "a");
        let _keep = board.join(2, "b");
        drop(rx);
        assert_eq!(due_pops(&board, 1), vec![(2, "b".to_string())]);
        assert_eq!(board.seats.lock().unwrap().len(), 1);
    }
}
