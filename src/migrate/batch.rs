//! Rows on their way from the source to the database: the tables a
//! migration fills ([`Table`]: their columns and primary key, as
//! `storage/postgres/schema.rs` defines them) and a [`Batch`] of rows of
//! one table, column by column, as the arrays one `INSERT … SELECT * FROM
//! unnest(…) ON CONFLICT (primary key) DO NOTHING` takes.

use tokio_postgres::types::ToSql;

/// One table the copy fills.
pub struct Table {
    pub name: &'static str,
    /// (column, PostgreSQL type) in the order a batch carries them.
    pub columns: &'static [(&'static str, &'static str)],
    /// The primary key's columns: the conflict a resumed copy skips.
    pub key: &'static str,
}

impl Table {
    /// The statement inserting a batch of this table.
    pub fn insert_sql(&self) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(c, _)| *c).collect();
        let arrays: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
            .collect();
        format!(
            "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT ({}) DO NOTHING",
            self.name,
            names.join(", "),
            arrays.join(", "),
            self.key
        )
    }
}

pub const USERS: Table = Table {
    name: "users",
    columns: &[
        ("id", "bigint"),
        ("username", "text"),
        ("display_name", "text"),
        ("password_hash", "text"),
        ("created_at", "bigint"),
        ("last_seen", "bigint"),
        ("presence", "smallint"),
        ("group_adds", "smallint"),
    ],
    key: "id",
};

pub const CONTACTS: Table = Table {
    name: "contacts",
    columns: &[
        ("owner", "bigint"),
        ("contact", "bigint"),
        ("added_at", "bigint"),
    ],
    key: "owner, contact",
};

pub const REVOKED: Table = Table {
    name: "revoked",
    columns: &[("jti", "text"), ("exp", "bigint")],
    key: "jti",
};

pub const ROOMS: Table = Table {
    name: "rooms",
    columns: &[
        ("id", "bigint"),
        ("kind", "smallint"),
        ("name", "text"),
        ("owner", "bigint"),
        ("created_at", "bigint"),
        ("last_seq", "bigint"),
    ],
    key: "id",
};

pub const MEMBERS: Table = Table {
    name: "members",
    columns: &[
        ("room", "bigint"),
        ("user_id", "bigint"),
        ("joined_at", "bigint"),
        ("read_seq", "bigint"),
    ],
    key: "room, user_id",
};

pub const MESSAGES: Table = Table {
    name: "messages",
    columns: &[
        ("room", "bigint"),
        ("seq", "bigint"),
        ("pos", "bigint"),
        ("sender", "bigint"),
        ("ts", "bigint"),
        ("client_id", "text"),
        ("text", "text"),
        ("pay_transfer", "bigint"),
        ("pay_amount", "bigint"),
        ("pay_to", "bigint"),
        ("pay_note", "text"),
    ],
    key: "room, seq",
};

pub const ACCOUNTS: Table = Table {
    name: "wallet_accounts",
    columns: &[("account", "bigint"), ("balance", "bigint")],
    key: "account",
};

pub const ENTRIES: Table = Table {
    name: "wallet_entries",
    columns: &[
        ("account", "bigint"),
        ("n", "bigint"),
        ("transfer", "bigint"),
        ("delta", "bigint"),
        ("balance_after", "bigint"),
        ("ts", "bigint"),
    ],
    key: "account, n",
};

pub const TRANSFERS: Table = Table {
    name: "wallet_transfers",
    columns: &[
        ("id", "bigint"),
        ("from_account", "bigint"),
        ("to_account", "bigint"),
        ("amount", "bigint"),
        ("note", "text"),
        ("key", "text"),
        ("state", "smallint"),
        ("created_at", "bigint"),
        ("execute_at", "bigint"),
        ("executed_at", "bigint"),
        ("repeat", "smallint"),
        ("parent", "bigint"),
        ("parent_run", "integer"),
        ("runs", "integer"),
        ("failure", "text"),
        ("requested_at", "bigint"),
    ],
    key: "id",
};

/// Every table, in the order the copy fills them.
pub const TABLES: [&Table; 9] = [
    &USERS, &CONTACTS, &REVOKED, &ROOMS, &MEMBERS, &MESSAGES, &ACCOUNTS, &ENTRIES, &TRANSFERS,
];

/// One value of a row.
pub enum Cell {
    Big(Option<i64>),
    Int(Option<i32>),
    Small(Option<i16>),
    Text(Option<String>),
}

/// An id or amount (`u64`) as the `bigint` of the same bits.
pub fn big(v: u64) -> Cell {
    Cell::Big(Some(v as i64))
}

pub fn text(s: impl Into<String>) -> Cell {
    Cell::Text(Some(s.into()))
}

enum Column {
    Big(Vec<Option<i64>>),
    Int(Vec<Option<i32>>),
    Small(Vec<Option<i16>>),
    Text(Vec<Option<String>>),
}

/// Most rows in one batch, and about the most bytes of text.
const MAX_ROWS: usize = 5_000;
const MAX_BYTES: usize = 4 << 20;

/// Rows of one table, column by column.
pub struct Batch {
    pub table: &'static Table,
    columns: Vec<Column>,
    pub rows: usize,
    bytes: usize,
}

impl Batch {
    pub fn new(table: &'static Table) -> Batch {
        let columns = table
            .columns
            .iter()
            .map(|(_, ty)| match *ty {
                "integer" => Column::Int(Vec::new()),
                "smallint" => Column::Small(Vec::new()),
                "text" => Column::Text(Vec::new()),
                _ => Column::Big(Vec::new()),
            })
            .collect();
        Batch {
            table,
            columns,
            rows: 0,
            bytes: 0,
        }
    }

    /// Adds a row: one cell per column, of the column's type (else
    /// nothing is added).
    pub fn push(&mut self, row: impl IntoIterator<Item = Cell>) -> Result<(), String> {
        let row: Vec<Cell> = row.into_iter().collect();
        let fits = row.len() == self.columns.len()
            && self.columns.iter().zip(&row).all(|pair| {
                matches!(
                    pair,
                    (Column::Big(_), Cell::Big(_))
                        | (Column::Int(_), Cell::Int(_))
                        | (Column::Small(_), Cell::Small(_))
                        | (Column::Text(_), Cell::Text(_))
                )
            });
        if !fits {
            return Err(format!(
                "internal error: a {} row does not fit its columns",
                self.table.name
            ));
        }
        for (column, cell) in self.columns.iter_mut().zip(row) {
            self.bytes += 8;
            match (column, cell) {
                (Column::Big(c), Cell::Big(v)) => c.push(v),
                (Column::Int(c), Cell::Int(v)) => c.push(v),
                (Column::Small(c), Cell::Small(v)) => c.push(v),
                (Column::Text(c), Cell::Text(v)) => {
                    self.bytes += v.as_ref().map_or(0, String::len);
                    c.push(v)
                }
                _ => {}
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Whether the batch should be sent now.
    pub fn full(&self) -> bool {
        self.rows >= MAX_ROWS || self.bytes >= MAX_BYTES
    }

    /// The columns as the insert's parameters.
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.columns
            .iter()
            .map(|c| -> &(dyn ToSql + Sync) {
                match c {
                    Column::Big(v) => v,
                    Column::Int(v) => v,
                    Column::Small(v) => v,
                    Column::Text(v) => v,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_must_fit_their_columns() {
        let mut b = Batch::new(&REVOKED);
        assert!(b.push([text("jti"), big(7)]).is_ok());
        assert_eq!(b.rows, 1);
        assert!(b.push([big(7), text("jti")]).is_err());
        assert!(b.push([text("short")]).is_err());
        assert_eq!(b.rows, 1);
        assert_eq!(
            REVOKED.insert_sql(),
            "INSERT INTO revoked (jti, exp) SELECT * FROM unnest($1::text[], $2::bigint[]) \
             ON CONFLICT (jti) DO NOTHING"
        );
    }
}
