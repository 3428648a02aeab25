//! Socket fixtures for the integration tests, run inside the test's network namespace and
//! cgroup.
//!
//! `pg-sockets hold SPEC...` opens the sockets, prints `ready` and sleeps until killed. SPEC:
//! `listen4:P` `listen6:P` (tcp listener), `bound4:P` `bound6:P` (tcp bound, not listening),
//! `udp4:P` `udp6:P`, `conn4:P:Q` (tcp bound to P, connected to a listener it opens on Q).
//!
//! `pg-sockets ephemeral N LISTEN_PORT` opens a listener on 127.0.0.1:LISTEN_PORT, then makes N
//! connections and N UDP sendto()s without bind(), all held open, and prints one JSON line with
//! the local ports the kernel chose (and the errors of the calls that failed).

use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
};

use integration_tests::sock;
use socket2::{Domain, SockAddr, Socket, Type};

/// A bound-only TCP socket (the caller holds it until the process dies).
fn tcp_bound(addr: SocketAddr) -> std::io::Result<Socket> {
    let opts = sock::Tcp {
        reuseaddr: false,
        v6only: true,
        listen: None,
    };
    sock::tcp(addr, opts).map_err(|(_, e)| std::io::Error::from_raw_os_error(e))
}

fn hold(specs: &[String]) {
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    for spec in specs {
        let parts: Vec<&str> = spec.split(':').collect();
        let port = |i: usize| {
            parts[i]
                .parse::<u16>()
                .unwrap_or_else(|_| panic!("bad spec {spec}"))
        };
        let v4 = |p| SocketAddr::from((Ipv4Addr::UNSPECIFIED, p));
        let v6 = |p| SocketAddr::from((Ipv6Addr::UNSPECIFIED, p));
        match parts[0] {
            "listen4" => keep.push(Box::new(TcpListener::bind(v4(port(1))).expect(spec))),
            "listen6" => keep.push(Box::new(TcpListener::bind(v6(port(1))).expect(spec))),
            "bound4" => keep.push(Box::new(tcp_bound(v4(port(1))).expect(spec))),
            "bound6" => keep.push(Box::new(tcp_bound(v6(port(1))).expect(spec))),
            "udp4" => keep.push(Box::new(UdpSocket::bind(v4(port(1))).expect(spec))),
            "udp6" => keep.push(Box::new(UdpSocket::bind(v6(port(1))).expect(spec))),
            "conn4" => {
                let server = TcpListener::bind((Ipv4Addr::LOCALHOST, port(2))).expect(spec);
                let client =
                    tcp_bound(SocketAddr::from((Ipv4Addr::LOCALHOST, port(1)))).expect(spec);
                let to = SockAddr::from(SocketAddr::from((Ipv4Addr::LOCALHOST, port(2))));
                client
                    .connect(&to)
                    .unwrap_or_else(|e| panic!("{spec}: connect: {e}"));
                let accepted = server.accept().expect(spec);
                keep.push(Box::new(server));
                keep.push(Box::new(accepted));
                keep.push(Box::new(client));
            }
            other => panic!("unknown socket kind {other}"),
        }
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

fn ephemeral(n: usize, listen_port: u16) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, listen_port)).expect("listener");
    let target = listener.local_addr().unwrap();
    let (mut tcp, mut tcp_err, mut udp, mut udp_err) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut keep_tcp = Vec::new();
    let mut keep_udp: Vec<UdpSocket> = Vec::new();
    for _ in 0..n {
        match TcpStream::connect(target) {
            Ok(s) => {
                tcp.push(s.local_addr().unwrap().port());
                keep_tcp.push(s);
            }
            Err(e) => tcp_err.push(e.raw_os_error().unwrap_or(-1)),
        }
        // socket() + sendto() without bind(): the kernel picks the port (autobind).
        let Ok(sock) = Socket::new_raw(Domain::IPV4, Type::DGRAM, None).map(UdpSocket::from) else {
            udp_err.push(-1);
            continue;
        };
        match sock.send_to(b"x", target) {
            Ok(_) => {
                udp.push(sock.local_addr().unwrap().port());
                keep_udp.push(sock);
            }
            Err(e) => udp_err.push(e.raw_os_error().unwrap_or(-1)),
        }
    }
    println!(
        "{}",
        serde_json::json!({ "tcp": tcp, "tcp_errors": tcp_err, "udp": udp, "udp_errors": udp_err })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("hold") => hold(&args[1..]),
        Some("ephemeral") => ephemeral(args[1].parse().unwrap(), args[2].parse().unwrap()),
        _ => panic!("usage: pg-sockets hold SPEC... | pg-sockets ephemeral N LISTEN_PORT"),
    }
}
