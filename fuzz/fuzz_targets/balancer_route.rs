//! The balancer's routing-key rules on arbitrary request heads: never
//! panic, and a head that yields a key keeps yielding it as bytes follow.
#![no_main]

use fluxbalancer::route;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let client = std::net::IpAddr::from([192, 0, 2, 1]);
    if let Ok(Some(key)) = route::route_key(data, client) {
        let mut longer = data.to_vec();
        longer.extend_from_slice(b"trailing body bytes");
        assert_eq!(route::route_key(&longer, client), Ok(Some(key)));
    }
});
