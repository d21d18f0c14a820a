//! The client endpoint: clients are checked against nothing but may prove a key; the
//! replica they reach is checked against the committee.

mod common;

use bulwark_crypto::{KeyPair, ReplicaId};
use bulwark_network::{ClientConnection, ClientEndpoint};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_get_replies_and_are_identified_by_their_key() {
    let config = test_config();
    let (committee, keys, _sockets) = committee(4);
    let (endpoint, mut requests) = ClientEndpoint::bind::<String, (Option<String>, String)>(
        config.clone(),
        ReplicaId(2),
        &keys[2],
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let address = endpoint.local_addr();
    let server = tokio::spawn(async move {
        while let Some(request) = requests.recv().await {
            let key = request.client.key.map(|k| k.to_string());
            request.reply.send(&(key, request.request.to_uppercase())).unwrap();
        }
    });

    let client_key = KeyPair::generate();
    let mut client = ClientConnection::<String, (Option<String>, String)>::connect(
        config.clone(),
        &committee,
        ReplicaId(2),
        address,
        Some(&client_key),
    )
    .await
    .unwrap();
    for word in ["put", "get"] {
        client.send(&word.to_string()).await.unwrap();
        let (key, reply) = within("reply", client.recv()).await.unwrap();
        assert_eq!(reply, word.to_uppercase());
        assert_eq!(key, Some(client_key.public().to_string()));
    }
    client.close().await;

    let mut anonymous = ClientConnection::<String, (Option<String>, String)>::connect(
        config.clone(),
        &committee,
        ReplicaId(2),
        address,
        None,
    )
    .await
    .unwrap();
    anonymous.send(&"hi".to_string()).await.unwrap();
    assert_eq!(within("reply", anonymous.recv()).await.unwrap(), (None, "HI".to_string()));
    anonymous.close().await;

    // The endpoint holds replica 2's key: a client expecting replica 1 refuses it.
    let wrong = ClientConnection::<String, (Option<String>, String)>::connect(
        config,
        &committee,
        ReplicaId(1),
        address,
        None,
    )
    .await;
    assert!(wrong.is_err());
    endpoint.shutdown().await;
    server.abort();
}
