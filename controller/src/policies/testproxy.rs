//! A TCP proxy in front of the test database that can be cut: every connection through it is
//! closed and new ones are refused, as when the database goes down (tests only).

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::store::postgres::PostgresSettings;

pub(crate) struct Proxy {
    addr: SocketAddr,
    cut: CancellationToken,
}

impl Proxy {
    /// Proxies to the server `settings` names; returns the proxy and settings that go through it.
    pub(crate) async fn start(settings: &PostgresSettings) -> (Self, PostgresSettings) {
        // postgres://USER@HOST:PORT/DB?…
        let (head, rest) = settings.url.split_once('@').unwrap();
        let (server, tail) = rest.split_once('/').unwrap();
        let server: SocketAddr = server.parse().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(server).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        });
        let through = PostgresSettings {
            url: format!("{head}@{addr}/{tail}"),
            password_file: settings.password_file.clone(),
        };
        (Self { addr, cut }, through)
    }

    /// "127.0.0.1:PORT", as the store names the database.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The database is gone: connections through the proxy close, new ones are refused.
    pub(crate) fn cut(&self) {
        self.cut.cancel();
    }
}
