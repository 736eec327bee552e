mod common;
use common::*;
use serde_json::json;

#[test]
fn smoke_cross_shard() {
    let hub = Hub::start(|_| {});
    let mut cs = clients_on_each_shard(hub.addr, 2);
    cs[1].subscribe("news");
    let extra = cs[0].publish_acked("news", json!({"n":1}));
    assert!(extra.is_empty());
    let m = cs[1].recv_json();
    assert_eq!(m, json!({"type":"message","channel":"news","data":{"n":1}}));
}
