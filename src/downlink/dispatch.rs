//! Who gets which inbox message: pure decisions, no I/O (the hub does the I/O).
//!
//! Each message goes to one app at a time: the longest-subscribed app whose filters match it.
//! It stays with that app until the app acks it (then it leaves the inbox) or disconnects
//! (then it is free again and goes to the next matching app: at least once). Messages are
//! handed out in arrival order; an app holds at most [`MAX_UNACKED_PER_APP`] unacked messages,
//! and a message whose app is at that limit waits for it rather than overtaking its
//! predecessors through another app, so order within a topic holds per app.

use std::collections::{BTreeMap, BTreeSet};

use crate::topic_filter;

/// Unacked messages one app may hold; more wait in the inbox until it acks. Bounds what a
/// slow app pins in memory and in its socket buffer.
pub const MAX_UNACKED_PER_APP: usize = 64;

/// A subscribed connection, numbered in the order they subscribed.
pub type AppId = u64;

struct Entry {
    topic: String,
    holder: Option<AppId>,
}

struct App {
    filters: Vec<String>,
    held: BTreeSet<i64>,
}

/// See the module docs.
#[derive(Default)]
pub struct Dispatcher {
    queue: BTreeMap<i64, Entry>,
    apps: BTreeMap<AppId, App>,
    /// Messages no app holds, in arrival order.
    free: BTreeSet<i64>,
    /// The oldest free message that may have become assignable since the last `assign`
    /// (an arrival moves it to the new message, a subscribe, ack, leave or release to the
    /// oldest free one): what waits behind it for no reason is not scanned again.
    scan_from: Option<i64>,
    /// The oldest free message last left waiting because its app had no room: an ack (room
    /// again) rescans from here, not from messages nobody subscribes to.
    blocked_from: Option<i64>,
    /// Free messages looked at by `assign`, for the tests of how much it scans.
    #[cfg(test)]
    scanned: usize,
}

impl Dispatcher {
    /// A message now in the inbox.
    pub fn arrive(&mut self, seq: i64, topic: String) {
        self.queue.insert(
            seq,
            Entry {
                topic,
                holder: None,
            },
        );
        self.free.insert(seq);
        self.rescan_from(seq);
    }

    fn rescan_from(&mut self, seq: i64) {
        self.scan_from = Some(self.scan_from.map_or(seq, |from| from.min(seq)));
    }

    /// Every free message may have become assignable.
    fn rescan_all(&mut self) {
        if let Some(&first) = self.free.first() {
            self.rescan_from(first);
        }
    }

    /// Adds `filters` to `app`'s (a first subscribe registers the app).
    pub fn subscribe(&mut self, app: AppId, filters: Vec<String>) {
        let entry = self.apps.entry(app).or_insert_with(|| App {
            filters: Vec::new(),
            held: BTreeSet::new(),
        });
        for filter in filters {
            if !entry.filters.contains(&filter) {
                entry.filters.push(filter);
            }
        }
        self.rescan_all();
    }

    /// The app disconnected: what it held unacked is free for the next subscriber. Returns how
    /// many messages were released.
    pub fn leave(&mut self, app: AppId) -> usize {
        let Some(gone) = self.apps.remove(&app) else {
            return 0;
        };
        for seq in &gone.held {
            if let Some(entry) = self.queue.get_mut(seq) {
                entry.holder = None;
                self.free.insert(*seq);
            }
        }
        // Messages the app matched first may now go to another one.
        self.rescan_all();
        gone.held.len()
    }

    /// `app` acks `seq`: `true` when it held it (the caller then removes it from the inbox).
    pub fn ack(&mut self, app: AppId, seq: i64) -> bool {
        let Some(entry) = self.apps.get_mut(&app) else {
            return false;
        };
        if !entry.held.remove(&seq) {
            return false;
        }
        self.queue.remove(&seq);
        self.room_again();
        true
    }

    /// `app` could not be sent `seq` (the inbox read failed): it is free again, for a later
    /// `assign`.
    pub fn release(&mut self, seq: i64) {
        if let Some(entry) = self.queue.get_mut(&seq)
            && let Some(app) = entry.holder.take()
        {
            if let Some(app) = self.apps.get_mut(&app) {
                app.held.remove(&seq);
            }
            self.free.insert(seq);
            self.rescan_from(seq);
        }
    }

    /// The inbox dropped `seq` (over `max_bytes`): forget it, also in the app holding it.
    pub fn forget(&mut self, seq: i64) {
        self.free.remove(&seq);
        if let Some(Entry {
            holder: Some(app), ..
        }) = self.queue.remove(&seq)
            && let Some(app) = self.apps.get_mut(&app)
        {
            app.held.remove(&seq);
            self.room_again();
        }
    }

    /// An app has room again: what waited for room may go.
    fn room_again(&mut self) {
        if let Some(blocked) = self.blocked_from {
            self.rescan_from(blocked);
        }
    }

    /// Hands out every free message that has a matching app with room, in arrival order; the
    /// caller sends each (app, seq) to its app. Looks only at messages that may have become
    /// assignable, and stops once no app has room.
    pub fn assign(&mut self) -> Vec<(AppId, i64)> {
        let mut handed = Vec::new();
        let Some(from) = self.scan_from.take() else {
            return handed;
        };
        if self.blocked_from.is_some_and(|blocked| blocked >= from) {
            // Scanned again below.
            self.blocked_from = None;
        }
        let mut block = |seq: i64| {
            self.blocked_from = Some(self.blocked_from.map_or(seq, |b| b.min(seq)));
        };
        for &seq in self.free.range(from..) {
            if self
                .apps
                .values()
                .all(|app| app.held.len() >= MAX_UNACKED_PER_APP)
            {
                block(seq);
                break;
            }
            #[cfg(test)]
            {
                self.scanned += 1;
            }
            let Some(entry) = self.queue.get_mut(&seq) else {
                continue;
            };
            let first_match = self
                .apps
                .iter_mut()
                .find(|(_, app)| topic_filter::any_matches(&app.filters, &entry.topic));
            let Some((id, app)) = first_match else {
                continue;
            };
            if app.held.len() >= MAX_UNACKED_PER_APP {
                block(seq);
                continue;
            }
            app.held.insert(seq);
            entry.holder = Some(*id);
            handed.push((*id, seq));
        }
        for (_, seq) in &handed {
            self.free.remove(seq);
        }
        handed
    }

    /// Messages in the inbox (held by an app or waiting).
    #[cfg(test)]
    pub fn depth(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(topics: &[&str]) -> Dispatcher {
        let mut dispatcher = Dispatcher::default();
        for (i, topic) in topics.iter().enumerate() {
            dispatcher.arrive(i as i64 + 1, topic.to_string());
        }
        dispatcher
    }

    #[test]
    fn messages_wait_until_a_matching_app_subscribes_then_go_in_order() {
        let mut dispatcher = filled(&["commands/a", "config/x", "commands/b"]);
        assert!(dispatcher.assign().is_empty(), "nobody listens yet");
        dispatcher.subscribe(1, vec!["commands/#".into()]);
        assert_eq!(dispatcher.assign(), vec![(1, 1), (1, 3)]);
        assert!(
            dispatcher.assign().is_empty(),
            "each message handed out once"
        );
        dispatcher.subscribe(2, vec!["config/+".into()]);
        assert_eq!(dispatcher.assign(), vec![(2, 2)]);
        assert_eq!(dispatcher.depth(), 3);
    }

    #[test]
    fn an_ack_removes_only_what_that_app_holds() {
        let mut dispatcher = filled(&["commands/a"]);
        dispatcher.subscribe(1, vec!["#".into()]);
        dispatcher.subscribe(2, vec!["#".into()]);
        assert_eq!(
            dispatcher.assign(),
            vec![(1, 1)],
            "the longest-subscribed app"
        );
        assert!(!dispatcher.ack(2, 1), "app 2 does not hold it");
        assert!(!dispatcher.ack(1, 99), "unknown seq");
        assert!(dispatcher.ack(1, 1));
        assert!(!dispatcher.ack(1, 1), "acked once");
        assert_eq!(dispatcher.depth(), 0);
    }

    #[test]
    fn what_a_leaving_app_held_goes_to_the_next_subscriber() {
        let mut dispatcher = filled(&["commands/a", "commands/b"]);
        dispatcher.subscribe(1, vec!["commands/#".into()]);
        assert_eq!(dispatcher.assign().len(), 2);
        assert!(dispatcher.ack(1, 1));
        assert_eq!(dispatcher.leave(1), 1);
        assert!(dispatcher.assign().is_empty(), "nobody left");
        dispatcher.subscribe(2, vec!["commands/b".into()]);
        assert_eq!(dispatcher.assign(), vec![(2, 2)]);
    }

    #[test]
    fn a_full_app_holds_back_its_later_messages_instead_of_reordering() {
        let topics = vec!["t"; MAX_UNACKED_PER_APP + 2];
        let mut dispatcher = filled(&topics);
        dispatcher.subscribe(1, vec!["t".into()]);
        dispatcher.subscribe(2, vec!["t".into()]);
        let handed = dispatcher.assign();
        assert_eq!(handed.len(), MAX_UNACKED_PER_APP);
        assert!(
            handed.iter().all(|(app, _)| *app == 1),
            "no overtaking via app 2"
        );
        assert!(dispatcher.ack(1, 1));
        assert_eq!(
            dispatcher.assign(),
            vec![(1, MAX_UNACKED_PER_APP as i64 + 1)]
        );
    }

    /// A backlog no app subscribes to is not scanned again for each new
    /// message or ack; and a message whose read failed is handed out again.
    #[test]
    fn assign_looks_only_at_what_may_have_become_assignable() {
        let waiting = vec!["nobody/listens"; 10_000];
        let mut dispatcher = filled(&waiting);
        dispatcher.subscribe(1, vec!["commands/#".into()]);
        assert!(dispatcher.assign().is_empty());
        let first_scan = dispatcher.scanned;
        assert_eq!(first_scan, 10_000);
        for n in 0..100 {
            let seq = 20_000 + n;
            dispatcher.arrive(seq, "commands/x".into());
            assert_eq!(dispatcher.assign(), vec![(1, seq)]);
            assert!(dispatcher.ack(1, seq));
        }
        assert!(dispatcher.assign().is_empty());
        assert!(
            dispatcher.scanned < first_scan + 10_000 * 2,
            "{} looked at",
            dispatcher.scanned
        );
        assert!(
            dispatcher.assign().is_empty(),
            "nothing changed: nothing to scan"
        );

        dispatcher.arrive(30_000, "commands/y".into());
        assert_eq!(dispatcher.assign(), vec![(1, 30_000)]);
        dispatcher.release(30_000);
        assert_eq!(dispatcher.assign(), vec![(1, 30_000)], "handed out again");
    }

    #[test]
    fn a_dropped_message_is_forgotten_by_its_holder() {
        let mut dispatcher = filled(&["t", "t"]);
        dispatcher.subscribe(1, vec!["t".into()]);
        dispatcher.assign();
        dispatcher.forget(1);
        assert!(!dispatcher.ack(1, 1));
        assert_eq!(dispatcher.depth(), 1);
    }
}
