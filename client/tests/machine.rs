//! The client machine with plain values (no engine, no network).

use fedtune_aggregation::{Adapter, LoraFactors, Matrix};
use fedtune_client::machine::ClientAction;
use fedtune_client::{Client, ClientConfig, ClientEvent, LoraPin};
use fedtune_protocol::envelope::{PayloadKind, Seal, seal};
use fedtune_protocol::{
    DeclineReason, Hyper, Identity, LoraPlan, Phase, RoundPlan, ToClient, ToCoordinator, digest,
    peft, plan_hash,
};

const MODEL: [u8; 32] = [1; 32];

fn client_pinned(pinned: &Identity, lora_pin: LoraPin) -> Client {
    Client::new(
        ClientConfig {
            federation: "f".into(),
            coordinator: pinned.public(),
            model_digest: MODEL,
            lora_pin,
            header_ttl_ms: 60_000,
            max_payload: 1 << 20,
        },
        Identity::from_seed([5; 32]),
    )
}

fn client(pinned: &Identity) -> Client {
    client_pinned(pinned, LoraPin::default())
}

fn lora(rank: usize, lora_alpha: f64) -> LoraPlan {
    LoraPlan {
        rank,
        lora_alpha,
        target_modules: vec!["q_proj".into()],
    }
}

/// A plan of round 1 carrying `carried` with a global adapter signed by `coord` for
/// `signed_for` (the LoRA configuration whose hash the header carries).
fn plan(coord: &Identity, carried: LoraPlan, signed_for: &LoraPlan) -> ToClient {
    let mut global = Adapter::default();
    global.modules.insert(
        "model.layers.0.self_attn.q_proj".into(),
        LoraFactors {
            a: Matrix::new(carried.rank, 2, vec![0.5; 2 * carried.rank]),
            b: Matrix::new(2, carried.rank, vec![0.0; 2 * carried.rank]),
            scale: 1.0,
        },
    );
    let mut bytes = peft::encode(&global);
    // A PEFT file as users have them: no per-module scales in its metadata, so the plan's α
    // decides the scale.
    bytes = strip_scales(&bytes);
    let header = seal(
        coord,
        Seal {
            kind: PayloadKind::Global,
            federation: "f",
            round: 0,
            plan_hash: plan_hash(&MODEL, signed_for),
            parent: [0; 32],
            nonce: [0; 16],
            now_ms: 0,
            ttl_ms: 60_000,
            num_examples: 0,
            metrics: vec![],
        },
        &bytes,
    );
    ToClient::Plan {
        plan: Box::new(RoundPlan {
            federation: "f".into(),
            round: 1,
            phase: Phase::Sft,
            hyper: Hyper::new(1e-3, 1, 1),
            lora: carried,
            global_digest: digest(&bytes),
            deadline_ms: 60_000,
        }),
        global: Box::new(header),
        payload: bytes,
    }
}

/// The same tensors without the `fedtune.scales` metadata.
fn strip_scales(bytes: &[u8]) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().collect();
    safetensors::serialize(views, None).unwrap()
}

/// What the client did with a plan: the job's module scale, or the declined reason.
fn outcome(c: &mut Client, coord: &Identity, msg: ToClient) -> Result<f32, String> {
    c.handle_connected(0);
    c.handle_message(
        0,
        ToClient::Welcome {
            coordinator: coord.public(),
            federation: "f".into(),
        },
    );
    c.handle_message(0, msg);
    for a in actions(c) {
        match a {
            ClientAction::Train(job) => {
                return Ok(job.global.modules.values().next().unwrap().scale);
            }
            ClientAction::Send(ToCoordinator::Decline { reason, .. }) => {
                return Err(reason.to_string());
            }
            _ => {}
        }
    }
    panic!("neither trained nor declined")
}

/// The plan carries the LoRA configuration: a client takes its α from the plan (scale α/r of
/// a PEFT file without fedtune's scales), declines a plan whose configuration is not the one
/// the coordinator signed, and declines a plan that breaks a setting its `client.toml` pins,
/// naming the setting.
#[test]
fn the_plan_carries_the_lora_configuration_and_a_site_may_pin_it() {
    let coord = Identity::from_seed([1; 32]);
    let ok = outcome(
        &mut client(&coord),
        &coord,
        plan(&coord, lora(2, 8.0), &lora(2, 8.0)),
    );
    assert_eq!(ok, Ok(4.0), "α 8 / r 2 from the plan");
    let ok = outcome(
        &mut client(&coord),
        &coord,
        plan(&coord, lora(2, 2.0), &lora(2, 2.0)),
    );
    assert_eq!(ok, Ok(1.0));
    // The plan says α 16 but the coordinator signed the global for α 8.
    let forged = outcome(
        &mut client(&coord),
        &coord,
        plan(&coord, lora(2, 16.0), &lora(2, 8.0)),
    );
    assert!(forged.unwrap_err().contains("LoRA configuration"));
    let pin = LoraPin {
        rank: Some(4),
        ..LoraPin::default()
    };
    let why = outcome(
        &mut client_pinned(&coord, pin),
        &coord,
        plan(&coord, lora(2, 8.0), &lora(2, 8.0)),
    )
    .unwrap_err();
    assert!(
        why.contains("rank is 2") && why.contains("requires 4"),
        "{why}"
    );
    let pin = LoraPin {
        lora_alpha: Some(8.0),
        target_modules: Some(vec!["q_proj".into()]),
        ..LoraPin::default()
    };
    assert_eq!(
        outcome(
            &mut client_pinned(&coord, pin),
            &coord,
            plan(&coord, lora(2, 8.0), &lora(2, 8.0))
        ),
        Ok(4.0)
    );
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

/// A client whose local training fails tells the coordinator why at once, typed
/// (`DeclineReason::Training`), logs it, and tells it again if the round's plan comes again
/// (the decline may have been lost with a connection); it does not train that round again.
#[test]
fn a_failed_local_training_is_declined_with_a_typed_reason() {
    let coord = Identity::from_seed([1; 32]);
    let mut c = client(&coord);
    let msg = plan(&coord, lora(2, 8.0), &lora(2, 8.0));
    assert!(outcome(&mut c, &coord, msg.clone()).is_ok());
    c.handle_train_failed(10, 1, "no preference pairs".into());
    let acts = actions(&mut c);
    assert!(acts.iter().any(|a| matches!(
        a,
        ClientAction::Log(ClientEvent::TrainFailed { round: 1, error }) if error == "no preference pairs"
    )));
    let declines = |acts: &[ClientAction]| -> Vec<DeclineReason> {
        acts.iter()
            .filter_map(|a| match a {
                ClientAction::Send(ToCoordinator::Decline { round: 1, reason }) => {
                    Some(reason.clone())
                }
                _ => None,
            })
            .collect()
    };
    let want = DeclineReason::Training("no preference pairs".into());
    assert_eq!(declines(&acts), std::slice::from_ref(&want));
    assert_eq!(want.label(), "training");
    // The plan again: the decline again, no second training job.
    c.handle_message(20, msg);
    let again = actions(&mut c);
    assert_eq!(declines(&again), [want]);
    assert!(!again.iter().any(|a| matches!(a, ClientAction::Train(_))));
}

/// A trained update leaves as an upload (not a control message); the client logs how the upload
/// went, keeps a refused one, and uploads the same signed bytes again when the round's plan comes
/// again. Once accepted, a repeated plan changes nothing.
#[test]
fn a_trained_update_is_an_upload_sent_again_while_unanswered() {
    let coord = Identity::from_seed([1; 32]);
    let mut c = client(&coord);
    let msg = plan(&coord, lora(2, 8.0), &lora(2, 8.0));
    assert!(outcome(&mut c, &coord, msg.clone()).is_ok());
    c.handle_trained(
        10,
        1,
        &Adapter::default(),
        7,
        vec![("train_loss".into(), 0.5)],
    );
    let uploads = |acts: &[ClientAction]| -> Vec<fedtune_protocol::Upload> {
        acts.iter()
            .filter_map(|a| match a {
                ClientAction::Upload(u) => Some(u.clone()),
                ClientAction::Send(m) => panic!("an update went as a control message: {m:?}"),
                _ => None,
            })
            .collect()
    };
    let first = uploads(&actions(&mut c));
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].header.header.round, 1);
    assert_eq!(first[0].header.header.num_examples, 7);
    c.handle_upload_refused(11, 1);
    assert!(matches!(
        actions(&mut c)[..],
        [ClientAction::Log(ClientEvent::UploadRefused { round: 1 })]
    ));
    c.handle_message(20, msg.clone());
    let again = actions(&mut c);
    assert!(matches!(
        again[0],
        ClientAction::Log(ClientEvent::Resend { round: 1 })
    ));
    assert_eq!(uploads(&again), first, "the same signed bytes");
    c.handle_uploaded(21, 1, 100);
    let bytes = first[0].payload.len() as u64;
    assert!(matches!(
        actions(&mut c)[..],
        [ClientAction::Log(ClientEvent::Uploaded { round: 1, bytes: b, resumed_from: 100 })] if b == bytes
    ));
    c.handle_message(30, ToClient::Accepted { round: 1 });
    c.handle_message(31, msg);
    assert!(
        actions(&mut c)
            .iter()
            .all(|a| matches!(a, ClientAction::Log(ClientEvent::Accepted { round: 1 }))),
    );
}
