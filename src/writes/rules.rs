//! The chat's rules as both storage backends' writers apply them
//! (`writes/chat.rs` on redb, `storage/postgres/chat.rs` on PostgreSQL):
//! who may change a group and how big it may grow, in what order a new
//! group's members join, how privacy settings change, and every refusal's
//! code and message. The backends read and write the rows; what is allowed
//! is decided here, once.

use crate::error::ApiError;
use crate::ids::{RoomId, UserId};
use crate::store::{Audience, Privacy};

/// 409: a new account's username (case-insensitive) is in use.
pub fn username_taken() -> ApiError {
    ApiError::new(
        hyper::StatusCode::CONFLICT,
        "username_taken",
        "that username is taken",
    )
}

/// 400: adding oneself as a contact.
pub fn cannot_add_yourself() -> ApiError {
    ApiError::bad_request("bad_request", "you cannot add yourself as a contact")
}

/// 400: a direct chat of a user with themselves.
pub fn direct_needs_another_user() -> ApiError {
    ApiError::bad_request("bad_request", "a direct chat needs another user")
}

/// 400: a group over `max` members (`max_group_members`).
pub fn too_many_members(max: usize) -> ApiError {
    ApiError::bad_request(
        "too_many_members",
        format!("a group has at most {max} members"),
    )
}

/// 400: adding or removing members of a direct chat.
pub fn direct_room_error() -> ApiError {
    ApiError::bad_request(
        "direct_room",
        "a direct chat always has exactly its two members",
    )
}

/// A new group's members in the order they join: the owner first, then
/// the others (once each) in id order.
pub fn group_members_in_order(owner: UserId, members: Vec<UserId>) -> Vec<UserId> {
    let mut ids = members;
    ids.retain(|&id| id != owner);
    ids.sort();
    ids.dedup();
    ids.insert(0, owner);
    ids
}

/// A group of `members` members at most `max`, else 400 `too_many_members`.
pub fn check_group_size(members: usize, max: usize) -> Result<(), ApiError> {
    if members > max {
        return Err(too_many_members(max));
    }
    Ok(())
}

/// Who may change the members of `room`, whose members (sorted) are
/// `members`: only one of them (else 404, as a room they cannot see), and
/// only in a group (400 `direct_room`).
pub fn check_member_change(room: RoomId, members: &[UserId], by: UserId) -> Result<(), ApiError> {
    if members.binary_search(&by).is_err() {
        return Err(ApiError::room_not_found());
    }
    if room.is_direct() {
        return Err(direct_room_error());
    }
    Ok(())
}

/// Removing `user` needs them among `members` (sorted), else 404
/// `user_not_found`.
pub fn check_is_member(members: &[UserId], user: UserId) -> Result<(), ApiError> {
    if members.binary_search(&user).is_err() {
        return Err(ApiError::not_found(
            "user_not_found",
            "that user is not a member of this room",
        ));
    }
    Ok(())
}

/// Who may remove `user` from a group owned by `owner`: they themselves
/// (leaving), or the owner; else 403 `forbidden`.
pub fn check_may_remove(by: UserId, user: UserId, owner: Option<UserId>) -> Result<(), ApiError> {
    if by != user && owner != Some(by) {
        return Err(ApiError::forbidden(
            "forbidden",
            "only the group's owner can remove other members",
        ));
    }
    Ok(())
}

/// 403 `not_allowed`: `name`'s `group_adds` setting does not admit the
/// one adding them.
pub fn not_allowed_to_add(name: &str) -> ApiError {
    ApiError::forbidden(
        "not_allowed",
        format!("{name} does not let you add them to groups (their privacy settings)"),
    )
}

/// The settings after a change: what is Some replaces what was.
pub fn privacy_after(
    before: Privacy,
    presence: Option<Audience>,
    group_adds: Option<Audience>,
) -> Privacy {
    Privacy {
        presence: presence.unwrap_or(before.presence),
        group_adds: group_adds.unwrap_or(before.group_adds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_starts_with_its_owner_then_the_others_in_id_order() {
        let ids =
            group_members_in_order(UserId(5), vec![UserId(9), UserId(5), UserId(2), UserId(9)]);
        assert_eq!(ids, [UserId(5), UserId(2), UserId(9)]);
        assert!(check_group_size(3, 3).is_ok());
        assert_eq!(
            check_group_size(4, 3).err().map(|e| e.code),
            Some("too_many_members")
        );
    }

    #[test]
    fn members_leave_themselves_or_are_removed_by_the_owner() {
        let (owner, a, b) = (UserId(1), UserId(2), UserId(3));
        assert!(check_may_remove(a, a, Some(owner)).is_ok());
        assert!(check_may_remove(owner, a, Some(owner)).is_ok());
        assert_eq!(
            check_may_remove(b, a, Some(owner)).err().map(|e| e.code),
            Some("forbidden")
        );
        assert_eq!(
            check_may_remove(b, a, None).err().map(|e| e.code),
            Some("forbidden")
        );
    }
}
