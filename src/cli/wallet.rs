//! `confab wallet credit|verify`: through the running server's admin
//! socket, or on the store file itself when no server runs.

use confab::admin::AdminError;
use confab::backup;

use std::process::ExitCode;

use super::output::not_accepting_or;
use crate::{WalletAction, WalletArgs, load_config, runtime};

/// `confab wallet credit|verify`.
pub(crate) fn run_wallet(args: WalletArgs) -> ExitCode {
    let (common, req, timeout) = match &args.action {
        WalletAction::Credit {
            user,
            amount,
            timeout,
            common,
        } => (
            common,
            serde_json::json!({"cmd": "credit", "user": user, "amount": amount}),
            *timeout,
        ),
        WalletAction::Verify { timeout, common } => {
            (common, serde_json::json!({"cmd": "verify"}), *timeout)
        }
    };
    let config = match load_config(common) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(r) => r,
        Err(code) => return code,
    };
    let dir = config.server.data_dir.clone();
    let answer = runtime.block_on(async {
        let wait = std::time::Duration::from_secs(timeout);
        if let Some(answer) = confab::admin::request(&dir, &req, wait, |_| {}).await {
            return answer.map_err(|e| match e {
                AdminError::Silent(_) => {
                    let unconfirmed = match req["user"].as_str() {
                        Some(user) => format!(
                            "; the credit is unconfirmed: check {user}'s balance before crediting again"
                        ),
                        None => String::new(),
                    };
                    format!(
                        "the server did not answer within {timeout} s; is it overloaded? see its log (--timeout SECS waits longer){unconfirmed}"
                    )
                }
                e => not_accepting_or(e),
            });
        }
        // No server: open the store and run the command here.
        let store = confab::store::Store::open_with(
            &dir,
            config.store.cache_mb << 20,
            Some(&backup::before_migration(&dir)),
        )?;
        let wiring = confab::writes::WalletWiring {
            settings: confab::wallet::WalletSettings {
                currency: config.wallet.wallet_currency.clone(),
                signup_bonus: config.wallet.signup_bonus,
                max_scheduled: config.wallet.max_scheduled_transfers,
            },
            ..Default::default()
        };
        let (writer, join) = confab::writes::GroupCommitWriter::spawn_with(
            store.clone(),
            std::sync::Arc::new(confab::hub::Hub::default()),
            Default::default(),
            config.store.clone(),
            config.limits.max_group_members,
            wiring,
        )
        .map_err(|e| e.to_string())?;
        let storage = confab::storage::embedded::Embedded::new(store, writer.clone());
        let answer = confab::admin::handle(&storage, &req).await;
        drop(storage);
        let _ = writer.submit(confab::writes::Op::Stop).await;
        drop(writer);
        let _ = join.join();
        Ok::<_, String>(answer)
    });
    let answer = match answer {
        Ok(a) => a,
        Err(e) => {
            eprintln!("confab: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&answer).unwrap_or_default()
    );
    if let Some(e) = answer["error"].as_str() {
        eprintln!("confab: {e}");
        return ExitCode::FAILURE;
    }
    match answer["breaches"].as_array() {
        Some(b) if !b.is_empty() => {
            eprintln!("confab: the ledger has {} breach(es)", b.len());
            ExitCode::FAILURE
        }
        Some(_) => {
            eprintln!("ledger verified: every invariant holds");
            ExitCode::SUCCESS
        }
        None => ExitCode::SUCCESS,
    }
}
