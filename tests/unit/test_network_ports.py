from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fcvm.core.errors import UsageError
from fcvm.network import VmNetwork, parse_publish, parse_publish_all
from fcvm.network.base import host_ifname, netns_name, vm_key
from fcvm.network.ports import PortMapping

ports = st.integers(min_value=1, max_value=65535)
host_ips = st.one_of(st.just(""), st.ip_addresses(v=4).map(str))
mappings = st.builds(PortMapping, host_ips, ports, ports, st.sampled_from(["tcp", "udp"]))


@given(mappings)
def test_round_trip(mapping: PortMapping) -> None:
    assert parse_publish(str(mapping)) == mapping
    assert PortMapping.from_json(json.loads(json.dumps(mapping.to_json()))) == mapping


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", PortMapping("", 8080, 80, "tcp")),
        ("8080:80/udp", PortMapping("", 8080, 80, "udp")),
        ("53:53/UDP", PortMapping("", 53, 53, "udp")),
        ("127.0.0.1:8080:80", PortMapping("127.0.0.1", 8080, 80, "tcp")),
        ("0.0.0.0:443:8443/tcp", PortMapping("0.0.0.0", 443, 8443, "tcp")),
        (" 1:65535 ", PortMapping("", 1, 65535, "tcp")),
    ],
)
def test_parses(spec: str, expected: PortMapping) -> None:
    assert parse_publish(spec) == expected


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("", "it is empty"),
        ("80", "a host port is required"),
        ("8080:80/sctp", "protocol 'sctp' is not supported"),
        ("0:80", "host port 0 is out of range"),
        ("8080:70000", "guest port 70000 is out of range"),
        ("http:80", "host port 'http' is not a number"),
        ("8080:", "guest port is missing"),
        ("localhost:8080:80", "host address 'localhost' is not an IPv4 address"),
        ("::8080:80", "too many ':'"),
        ("[::1]:8080:80", "IPv6 host addresses are not supported"),
        ("8000-8010:80", "port ranges are not supported"),
        ("1.2.3.4:5:6:7", "too many ':'"),
        (":8080:80", "the host address before the first ':' is empty"),
        ("\uff18\uff10:80", "not a number"),  # fullwidth digits
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_publish(spec)
    message = str(info.value)
    assert why in message
    assert "[HOSTIP:]HOSTPORT:GUESTPORT[/udp]" in message
    assert "\n" not in message
    assert info.value.exit_code == 2


@given(st.text(max_size=30))
def test_anything_either_parses_or_is_a_usage_error(spec: str) -> None:
    try:
        mapping = parse_publish(spec)
    except UsageError:
        return
    assert 1 <= mapping.host_port <= 65535 and 1 <= mapping.guest_port <= 65535
    assert mapping.protocol in ("tcp", "udp")


def test_repeated_host_port_is_rejected() -> None:
    assert len(parse_publish_all(["8080:80", "8080:80/udp", "127.0.0.1:9090:90", "127.0.0.2:9090:91"])) == 4
    with pytest.raises(UsageError, match="publish the same host port 8080/tcp"):
        parse_publish_all(["8080:80", "127.0.0.1:8080:81"])


@given(st.text(min_size=1, max_size=64))
def test_names_fit_ifnamsiz(vm_id: str) -> None:
    assert len(host_ifname(vm_id)) <= 15
    assert vm_key(vm_id) == vm_key(vm_id) and len(vm_key(vm_id)) == 12
    assert "/" not in netns_name(vm_id)


def test_names_come_from_the_vm_id() -> None:
    assert host_ifname("0123456789ab") == "fc0123456789abh"
    assert netns_name("0123456789ab") == "fcvm-0123456789ab"


def test_vm_network_json_round_trip_and_published_addresses() -> None:
    ports = [parse_publish("8080:80"), parse_publish("10.1.2.3:53:53/udp"), parse_publish("0.0.0.0:9000:9000")]
    bridged = VmNetwork(mode="bridged", vm_id="0123456789ab", ports=ports, netns="fcvm-0123456789ab",
                        host_if="fc0123456789abh", subnet="172.30.0.4/30")
    rootless = VmNetwork(mode="rootless", vm_id="0123456789ac", ports=ports, holder_pid=42, holder_start=7,
                         loopback="127.100.0.2")
    for net in (bridged, rootless):
        assert VmNetwork.from_json(json.loads(json.dumps(net.to_json()))) == net
        assert net.guest_spec() == {"address": "172.31.0.2", "prefix": 30, "gateway": "172.31.0.1",
                                    "mac": "06:00:ac:1f:00:02", "dns": []}
    assert [(a, p) for a, p, _ in bridged.published()] == [("127.0.0.1", 8080), ("10.1.2.3", 53), ("127.0.0.1", 9000)]
    assert [(a, p) for a, p, _ in rootless.published()] == [("127.100.0.2", 8080), ("10.1.2.3", 53),
                                                            ("127.0.0.1", 9000)]
    assert bridged.ns_side_ip == "172.30.0.6" and bridged.host_side_ip == "172.30.0.5"
    assert bridged.enter_argv() == ["nsenter", "--net=/run/netns/fcvm-0123456789ab"]
    assert rootless.enter_argv() == ["nsenter", "--preserve-credentials", "--user=/proc/42/ns/user",
                                     "--net=/proc/42/ns/net"]


def test_mode_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcvm.core.kinds import NetworkMode
    from fcvm.network import default_mode, setup_network
    from fcvm.state.journal import Journal
    from fcvm.state.store import Store

    store = Store()
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_mode() == "rootless"
    with pytest.raises(UsageError, match="--network bridged needs root") as info:
        setup_network(NetworkMode.BRIDGED, store=store, journal=Journal(store, "a"), vm_id="a", ports=[])
    assert "--network rootless" in str(info.value)
    assert store.journal_entries("a") == [] and store.allocations("a") == {}
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_mode() == "bridged"
