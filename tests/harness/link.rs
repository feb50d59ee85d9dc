//! A device's own network namespace, joined to a cloud's namespace by a veth pair: everything
//! that device sends to or receives from the cloud crosses that one link, so its interface
//! counters are the device's traffic (benches/wire.rs counts them).

use super::*;

/// The device end's interface: each device has its own namespace, so one name serves all.
pub const DEVICE_LINK_IFACE: &str = "wire0";

/// A device namespace linked to a cloud namespace. The cloud's end of every link has the same
/// address, [`CLOUD_LINK_IP`] (a /32 with a route per device), so one certificate and one
/// config serve every device; the device's end has `10.77.0.<10 + index>`.
pub struct DeviceLink {
    /// Deleting it (on drop) deletes the veth pair too, once the processes in it are gone.
    pub namespace: Namespace,
    pub device_ip: String,
}

impl DeviceLink {
    /// Links a new device namespace to `cloud`; `index` (below 240) tells devices apart.
    pub fn create(cloud: &Namespace, index: u8) -> DeviceLink {
        assert!(index < 240, "device index {index} out of 10.77.0.0/24");
        let namespace = Namespace::create();
        let link = DeviceLink {
            namespace,
            device_ip: format!("10.77.0.{}", 10 + u32::from(index)),
        };
        let cloud_iface = format!("dev{index}");
        run_ok(Command::new("ip").args([
            "link",
            "add",
            DEVICE_LINK_IFACE,
            "netns",
            &link.namespace.name,
            "type",
            "veth",
            "peer",
            "name",
            &cloud_iface,
            "netns",
            &cloud.name,
        ]));
        let ends = [
            (&link.namespace, DEVICE_LINK_IFACE, link.device_ip.as_str()),
            (cloud, cloud_iface.as_str(), CLOUD_LINK_IP),
        ];
        for (namespace, iface, address) in ends {
            // No IPv6: its router solicitations and multicast reports would be counted as the
            // device's traffic. `-e`: a kernel without IPv6 has nothing to turn off.
            run_ok(
                namespace
                    .command("sysctl")
                    .args(["-qew", &format!("net.ipv6.conf.{iface}.disable_ipv6=1")]),
            );
            // One MSS per packet, as on a real link: veth would otherwise carry 64 KB GSO
            // packets, and their per-packet headers would be missing from the counts.
            ip(namespace, &["link", "set", iface, "gso_max_segs", "1"]);
            ip(
                namespace,
                &["addr", "add", &format!("{address}/32"), "dev", iface],
            );
            ip(namespace, &["link", "set", iface, "up"]);
        }
        let device_mac = mac(&link.namespace, DEVICE_LINK_IFACE);
        let cloud_mac = mac(cloud, &cloud_iface);
        let (device, device_ip) = (&link.namespace, link.device_ip.as_str());
        ip(
            device,
            &[
                "route",
                "add",
                &format!("{CLOUD_LINK_IP}/32"),
                "dev",
                DEVICE_LINK_IFACE,
            ],
        );
        ip(
            cloud,
            &[
                "route",
                "add",
                &format!("{device_ip}/32"),
                "dev",
                &cloud_iface,
            ],
        );
        // Permanent neighbours: no ARP on the link (a cellular link has none either).
        let permanent = |namespace: &Namespace, address: &str, mac: &str, iface: &str| {
            ip(
                namespace,
                &[
                    "neigh",
                    "replace",
                    address,
                    "lladdr",
                    mac,
                    "dev",
                    iface,
                    "nud",
                    "permanent",
                ],
            )
        };
        permanent(device, CLOUD_LINK_IP, &cloud_mac, DEVICE_LINK_IFACE);
        permanent(cloud, device_ip, &device_mac, &cloud_iface);
        link
    }

    /// The device end's interface counters now.
    pub fn counters(&self) -> LinkCounters {
        let dir = format!("/sys/class/net/{DEVICE_LINK_IFACE}/statistics");
        let files =
            ["tx_bytes", "tx_packets", "rx_bytes", "rx_packets"].map(|f| format!("{dir}/{f}"));
        let text = run_ok(self.namespace.command("cat").args(&files));
        let values: Vec<u64> = text
            .lines()
            .map(|l| l.trim().parse().unwrap_or(0))
            .collect();
        assert_eq!(values.len(), 4, "link counters: {text:?}");
        LinkCounters {
            tx_bytes: values[0],
            tx_packets: values[1],
            rx_bytes: values[2],
            rx_packets: values[3],
        }
    }
}

fn ip(namespace: &Namespace, args: &[&str]) {
    run_ok(Command::new("ip").arg("-n").arg(&namespace.name).args(args));
}

fn mac(namespace: &Namespace, iface: &str) -> String {
    run_ok(
        namespace
            .command("cat")
            .arg(format!("/sys/class/net/{iface}/address")),
    )
    .trim()
    .to_owned()
}

/// A link's interface counters (Ethernet frames), seen from the device: tx is upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkCounters {
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub rx_packets: u64,
}

/// A veth frame's Ethernet header, which a cellular link does not carry.
const ETHERNET_HEADER: u64 = 14;

impl LinkCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &LinkCounters) -> LinkCounters {
        LinkCounters {
            tx_bytes: self.tx_bytes.saturating_sub(earlier.tx_bytes),
            tx_packets: self.tx_packets.saturating_sub(earlier.tx_packets),
            rx_bytes: self.rx_bytes.saturating_sub(earlier.rx_bytes),
            rx_packets: self.rx_packets.saturating_sub(earlier.rx_packets),
        }
    }

    /// IP bytes sent: frames less their Ethernet headers.
    pub fn ip_up(&self) -> u64 {
        self.tx_bytes
            .saturating_sub(ETHERNET_HEADER * self.tx_packets)
    }

    /// IP bytes received.
    pub fn ip_down(&self) -> u64 {
        self.rx_bytes
            .saturating_sub(ETHERNET_HEADER * self.rx_packets)
    }
}
