//! The client machine with plain values (no engine, no network).

use fedtune_client::machine::ClientAction;
use fedtune_client::{Client, ClientConfig};
use fedtune_protocol::{Identity, ToClient, ToCoordinator};

fn client(pinned: &Identity) -> Client {
    Client::new(
        ClientConfig {
            federation: "f".into(),
            coordinator: pinned.public(),
            plan_hash: [1; 32],
            header_ttl_ms: 60_000,
            max_payload: 1 << 20,
            lora_alpha: 8.0,
        },
        Identity::from_seed([5; 32]),
    )
}

fn actions(c: &mut Client) -> Vec<ClientAction> {
    std::iter::from_fn(|| c.poll_action()).collect()
}

/// A coordinator that is not the pinned one stops the client with a message naming both keys
/// (the daemon turns it into an error on stderr and a non-zero exit) instead of waiting for
/// plans it would ignore.
#[test]
fn a_coordinator_with_another_key_stops_the_client_naming_both_keys() {
    let pinned = Identity::from_seed([1; 32]);
    let other = Identity::from_seed([2; 32]);
    let mut c = client(&pinned);
    c.handle_connected(0);
    assert!(matches!(
        actions(&mut c).as_slice(),
        [ClientAction::Send(ToCoordinator::Hello { .. })]
    ));
    c.handle_message(
        0,
        ToClient::Welcome {
            coordinator: other.public(),
            federation: "f".into(),
        },
    );
    let stop: Vec<String> = actions(&mut c)
        .into_iter()
        .filter_map(|a| match a {
            ClientAction::Stop(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(stop.len(), 1);
    assert!(
        stop[0].contains(&other.public().to_hex()) && stop[0].contains(&pinned.public().to_hex()),
        "{}",
        stop[0]
    );
    // The pinned coordinator is welcomed without stopping.
    let mut c = client(&pinned);
    c.handle_connected(0);
    c.handle_message(
        0,
        ToClient::Welcome {
            coordinator: pinned.public(),
            federation: "f".into(),
        },
    );
    assert!(
        !actions(&mut c)
            .iter()
            .any(|a| matches!(a, ClientAction::Stop(_)))
    );
}
