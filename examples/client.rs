//! A tonic client that guards its calls against a server that goes silent.
//!
//! ```text
//! cargo run --example server          # in one terminal
//! cargo run --example client          # in another [-- --addr 127.0.0.1:50051]
//! ```
//!
//! A `Channel` is a tower service, so the same [`StreamGuardLayer`] that
//! guards servers wraps it. Without a guard, `Streaming::message().await`
//! blocks for as long as the server says nothing and keeps the connection
//! open (seed 000's complaint: a bidi client's `Receive()` blocks forever).
//! With one, it returns `DEADLINE_EXCEEDED` naming the guard, and the HTTP/2
//! stream is reset so the server learns that the client gave up.
//!
//! Three calls against `examples/server`:
//!
//! 1. a server stream whose messages are 5 s apart: the client's 1 s
//!    `response_idle_timeout` gives up on it;
//! 2. a bidi call whose server echoes two messages and then has nothing to
//!    say: same;
//! 3. a busy server stream: the client's 2 s `max_lifetime` bounds the whole
//!    call.
//!
//! Each call's end event (from the client's guard) is printed as a JSON line.

mod common;

use std::{process::ExitCode, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};
use tower::Layer;
use tower_stream_guard::StreamGuardLayer;

use common::echo::{EchoReply, EchoRequest, StreamRequest, echo_client::EchoClient};

/// Reads until the stream ends or fails; says how and when.
async fn read_all(name: &str, mut stream: Streaming<EchoReply>, start: Instant) {
    let mut received = 0;
    let outcome: Result<(), Status> = loop {
        match stream.message().await {
            Ok(Some(_)) => received += 1,
            Ok(None) => break Ok(()),
            Err(status) => break Err(status),
        }
    };
    let at = start.elapsed().as_millis();
    match outcome {
        Ok(()) => println!("{name}: ended normally after {received} messages, {at} ms"),
        Err(status) => println!(
            "{name}: {:?} {:?} after {received} messages, {at} ms",
            status.code(),
            status.message()
        ),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let addr = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => "127.0.0.1:50051".to_owned(),
        [flag, addr] if flag == "--addr" => addr.clone(),
        _ => {
            eprintln!("usage: client [--addr HOST:PORT]");
            return ExitCode::from(2);
        }
    };
    let channel = match Channel::from_shared(format!("http://{addr}")) {
        Ok(endpoint) => match endpoint.connect().await {
            Ok(channel) => channel,
            Err(err) => {
                eprintln!(
                    "cannot connect to {addr}: {err}\nstart the server first: cargo run --example server"
                );
                return ExitCode::FAILURE;
            }
        },
        Err(err) => {
            eprintln!("invalid address {addr}: {err}");
            return ExitCode::from(2);
        }
    };

    let guard = match StreamGuardLayer::builder()
        .response_idle_timeout(Duration::from_secs(1))
        .max_lifetime(Duration::from_secs(2))
        .build()
    {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("bad guard configuration: {err}");
            return ExitCode::from(2);
        }
    };
    let mut events = guard.subscribe();
    let printer = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            println!("  {}", event.to_json());
        }
    });
    // The guarded channel: a tower service like the channel it wraps.
    let mut client = EchoClient::new(guard.clone().for_tonic_channel().layer(channel));

    let start = Instant::now();
    let slow = StreamRequest {
        count: 0,
        interval_ms: 5_000,
        size: 8,
    };
    match client.server_stream(slow).await {
        Ok(response) => read_all("1. slow server stream", response.into_inner(), start).await,
        Err(status) => println!("1. slow server stream: refused: {status:?}"),
    }

    let start = Instant::now();
    let (tx, rx) = mpsc::channel(4);
    for text in ["hello", "world"] {
        let _ = tx
            .send(EchoRequest {
                message: text.into(),
            })
            .await;
    }
    match client.bidi(ReceiverStream::new(rx)).await {
        // `tx` stays open: the server has nothing more to echo.
        Ok(response) => read_all("2. quiet bidi", response.into_inner(), start).await,
        Err(status) => println!("2. quiet bidi: refused: {status:?}"),
    }
    drop(tx);

    let start = Instant::now();
    let busy = StreamRequest {
        count: 0,
        interval_ms: 100,
        size: 8,
    };
    match client.server_stream(busy).await {
        Ok(response) => read_all("3. busy server stream", response.into_inner(), start).await,
        Err(status) => println!("3. busy server stream: refused: {status:?}"),
    }

    drop(client);
    tokio::time::sleep(Duration::from_millis(50)).await;
    printer.abort();
    println!("active guarded calls: {}", guard.active_streams());
    ExitCode::SUCCESS
}
