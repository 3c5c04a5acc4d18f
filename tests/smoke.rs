mod common;

#[test]
fn base_endpoint_answers_with_api_version() {
    let b = common::Berth::start("[[namespace]]\nprefix = \"team\"\n");
    let r = reqwest::blocking::get(format!("{}/v2/", b.url())).unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
}
