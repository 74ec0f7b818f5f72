# UNTESTED EXAMPLE (docs/cluster.md): a Flint fleet on Nomad. Nothing in CI runs this file; adapt it and test it
# on your cluster before use.
#
# - flintd: a system job on every node that has KVM (node.class "kvm"), with raw_exec because flintd must be root on
#   the host: it creates network namespaces, nftables rules and cgroups, and jails VMMs. It is the same binary and
#   configuration as packaging/flintd.service. Its VMs outlive flintd (it re-adopts them), so the task's kill
#   signal is SIGTERM with a short timeout, and the allocation must not be moved to another node.
# - flint-router: a stateless service job, two or more instances, unprivileged, behind Nomad's service discovery.
# - etcd runs outside this job (packaging/etcd-flint.service.example), three or five members.

job "flint-hosts" {
  type        = "system"
  datacenters = ["dc1"]

  constraint {
    attribute = "${node.class}"
    value     = "kvm"
  }

  group "flintd" {
    network {
      port "cluster" { static = 7443 } # [cluster] listen/advertise: routers reach hosts here (mutual TLS)
      port "front" { static = 8480 }   # [network] front_end: exposed guest ports
    }

    task "flintd" {
      driver = "raw_exec" # root on the host: netns, nftables, cgroups, the jail

      config {
        command = "/usr/local/bin/flintd"
        args    = ["--config", "/etc/flint/flintd.toml"]
      }

      # /etc/flint/flintd.toml on each node, e.g.:
      #   [cluster]
      #   etcd = ["https://10.0.0.11:2379", "https://10.0.0.12:2379", "https://10.0.0.13:2379"]
      #   listen = "0.0.0.0:7443"
      #   advertise = "https://<this node's address>:7443"
      #   tls_cert = "/etc/flint/cluster/host.pem"
      #   tls_key = "/etc/flint/cluster/host.key"
      #   client_ca = "/etc/flint/cluster/ca.pem"
      # and the store's S3 settings ([store.s3], secret_file) with sessions.cross_host = true: every host of a fleet
      # shares one bucket.

      kill_signal  = "SIGTERM"
      kill_timeout = "40s" # flintd finishes operations in flight for up to 30 s; VMs keep running

      resources {
        cpu    = 500
        memory = 512 # flintd itself; guest memory is not Nomad's to schedule on these nodes
      }
    }
  }
}

job "flint-router" {
  type        = "service"
  datacenters = ["dc1"]

  group "router" {
    count = 2

    network {
      port "api" { to = 7480 }
    }

    service {
      name     = "flint-router"
      port     = "api"
      provider = "nomad"

      check {
        type     = "tcp"
        interval = "10s"
        timeout  = "2s"
      }
    }

    task "flint-router" {
      driver = "exec"

      config {
        command = "/usr/local/bin/flint-router"
        args = [
          "--etcd", "https://10.0.0.11:2379", "--etcd", "https://10.0.0.12:2379", "--etcd", "https://10.0.0.13:2379",
          "--etcd-ca", "secrets/etcd-ca.pem", "--etcd-cert", "secrets/etcd-client.pem", "--etcd-key", "secrets/etcd-client.key",
          "--listen", "0.0.0.0:7480",
          "--tls-cert", "secrets/router.pem", "--tls-key", "secrets/router.key", "--client-ca", "secrets/ca.pem",
          "--host-ca", "secrets/ca.pem", "--cert", "secrets/client.pem", "--key", "secrets/client.key",
        ]
      }

      # The certificates, e.g. from Vault: one template block per file, written under secrets/.

      resources {
        cpu    = 500
        memory = 128
      }
    }
  }
}
