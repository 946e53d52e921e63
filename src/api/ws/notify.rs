//! What a session tells other users of this node: presence when a user's
//! first session begins or last one ends, or when they change who sees it
//! (only to the peers their privacy settings allow), and frames for a
//! room's other members (typing, delivered receipts).

use bytes::Bytes;

use crate::api::shared::AppState;
use crate::frames::ServerFrame;
use crate::hub::OutFrame;
use crate::ids::{RoomId, UserId};
use crate::store::now_ms;
use crate::writes::Op;

/// A user's last session (here or behind a proxy) ended: tell the peers of
/// their direct chats on this node and record when.
pub(crate) async fn went_offline(state: &AppState, user: UserId) {
    let ts = now_ms();
    let peers = state.storage.direct_peers(user).await.unwrap_or_default();
    announce_presence(state, &peers, user, false, Some(ts)).await;
    let _ = state.storage.submit(Op::LastSeen { user, ts }).await;
}

/// A user's first session (here or behind a proxy) began.
pub(crate) async fn went_online(state: &AppState, user: UserId) {
    let peers = state.storage.direct_peers(user).await.unwrap_or_default();
    announce_presence(state, &peers, user, true, None).await;
}

/// The `presence` frames of `peers` as this node sees them, for `viewer`:
/// only of the peers whose privacy settings let `viewer` see it.
pub(crate) async fn presence_of(state: &AppState, viewer: UserId, peers: &[UserId]) -> Vec<Bytes> {
    let visible = state
        .storage
        .presences_seen_by(viewer, peers)
        .await
        .unwrap_or_default();
    let mut frames = Vec::with_capacity(visible.len());
    for &peer in &visible {
        let online = state.hub.is_online(peer);
        let last_seen = if online {
            None
        } else {
            state.storage.last_seen(peer).await.ok().flatten()
        };
        frames.push(
            ServerFrame::Presence {
                user: peer,
                online,
                last_seen,
            }
            .to_bytes(),
        );
    }
    frames
}

/// `user` changed who sees their presence: the peers who see it get it
/// again, the others get "offline, last seen unknown" (the frame a peer
/// who never saw it would have had nothing of).
pub(crate) async fn privacy_changed(state: &AppState, user: UserId) {
    let peers = state.storage.direct_peers(user).await.unwrap_or_default();
    let seeing = state
        .storage
        .presence_audience(user, &peers)
        .await
        .unwrap_or_default();
    let online = state.hub.is_online(user);
    let last_seen = if online {
        None
    } else {
        state.storage.last_seen(user).await.ok().flatten()
    };
    for &peer in &peers {
        let (online, last_seen) = if seeing.contains(&peer) {
            (online, last_seen)
        } else {
            (false, None)
        };
        let frame = OutFrame::text(
            ServerFrame::Presence {
                user,
                online,
                last_seen,
            }
            .to_bytes(),
        );
        state.hub.send_to_user(peer, &frame, None);
    }
}

/// Tells those of `peers` whom `user`'s privacy settings let see it that
/// `user` went online or offline.
pub(super) async fn announce_presence(
    state: &AppState,
    peers: &[UserId],
    user: UserId,
    online: bool,
    last_seen: Option<i64>,
) {
    let frame = OutFrame {
        bytes: ServerFrame::Presence {
            user,
            online,
            last_seen,
        }
        .to_bytes(),
        room_seq: None,
        pong: false,
    };
    for peer in state
        .storage
        .presence_audience(user, peers)
        .await
        .unwrap_or_default()
    {
        state.hub.send_to_user(peer, &frame, None);
    }
}

pub(super) async fn send_to_others(state: &AppState, room: RoomId, user: UserId, bytes: Bytes) {
    let frame = OutFrame {
        bytes,
        room_seq: None,
        pong: false,
    };
    for m in state.storage.members(room).await.unwrap_or_default() {
        if m != user {
            state.hub.send_to_user(m, &frame, None);
        }
    }
}
