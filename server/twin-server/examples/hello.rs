//! actix-web's bare hello world: the baseline the HTTP submission benchmark compares against.
//! `cargo run --release -p twin-server --example hello -- 127.0.0.1:0` prints its address.

use actix_web::{App, HttpServer, get};

#[get("/")]
async fn hello() -> &'static str {
    "Hello world!"
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let server = HttpServer::new(|| App::new().service(hello)).bind(addr)?;
    for a in server.addrs() {
        println!("hello listening on http://{a}");
    }
    server.run().await
}
