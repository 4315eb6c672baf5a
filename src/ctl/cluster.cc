#include "ctl/cluster.h"

#include <cstdio>
#include <cstdlib>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "agent/http.h"
#include "common/json.h"
#include "net/url.h"

namespace ferry::ctl {
namespace {

double Num(const nlohmann::json& j, const char* k) { return JsonNumber(j, k); }
std::string Str(const nlohmann::json& j, const char* k) { return JsonString(j, k); }

class Cluster final : public ClusterCommands {
 public:
  explicit Cluster(CLI::App& app) {
    const char* env = std::getenv("FERRY_CONTROLLER");
    url_ = env && *env ? env : "http://127.0.0.1:7100";
    cmd_ = app.add_subcommand("cluster", "the cluster through ferry-controller: hosts, VMs, migrations, drain");
    cmd_->require_subcommand(1);
    cmd_->add_option("--controller", url_, "the controller's URL (default $FERRY_CONTROLLER or http://127.0.0.1:7100)");
    cmd_->add_option("--tls-cert", tls_.cert, "with an https:// controller: your certificate (PEM)");
    cmd_->add_option("--tls-key", tls_.key, "the certificate's private key (PEM)");
    cmd_->add_option("--tls-ca", tls_.ca, "the CA the controller's certificate must chain to (PEM)");
    cmd_->add_flag("--json", json_, "the API's JSON on stdout");

    hosts_ = cmd_->add_subcommand("hosts", "list the hosts: state, CPU load, VMs");
    add_host_ = cmd_->add_subcommand("add-host", "declare a host by its agent's URL");
    add_host_->add_option("name", name_, "the host's name (its agent's --name)")->required();
    add_host_->add_option("agent", agent_, "the agent's URL, e.g. https://10.0.0.1:7101")->required();
    drain_ = cmd_->add_subcommand("drain", "move every VM off a host (maintenance)");
    drain_->add_option("host", name_)->required();
    undrain_ = cmd_->add_subcommand("undrain", "let a drained host take VMs again");
    undrain_->add_option("host", name_)->required();
    vms_ = cmd_->add_subcommand("vms", "list the VMs");
    create_ = cmd_->add_subcommand("create-vm", "start a VM (placed by the controller unless --host)");
    create_->add_option("name", name_)->required();
    create_->add_option("--kernel", kernel_, "Linux RISC-V Image (a path on the host)")->required();
    create_->add_option("--initrd", initrd_, "initramfs (a path on the host)");
    create_->add_option("--mem", mem_, "guest RAM, e.g. 256M")->required();
    create_->add_option("--cmdline", cmdline_, "kernel command line");
    create_->add_option("--host", host_, "run it on this host");
    delete_ = cmd_->add_subcommand("delete-vm", "stop a VM and forget it");
    delete_->add_option("name", name_)->required();
    console_ = cmd_->add_subcommand("console", "the last 64 KiB of a VM's console");
    console_->add_option("name", name_)->required();
    migrations_ = cmd_->add_subcommand("migrations", "migrations, the newest last: reason, result, downtime");
    events_ = cmd_->add_subcommand("events", "the controller's decisions and state changes");
    plan_ = cmd_->add_subcommand("plan", "what the planner would do now, and why (dry run)");
  }

  bool parsed() const override { return cmd_->parsed(); }

  int Run() override {
    if (hosts_->parsed()) return Show("GET", "/v1/hosts", nullptr, &Cluster::PrintHosts);
    if (add_host_->parsed()) return Show("POST", "/v1/hosts", {{"name", name_}, {"agent", agent_}}, nullptr);
    if (drain_->parsed()) return Show("POST", "/v1/hosts/" + name_ + "/drain", nlohmann::json::object(), nullptr);
    if (undrain_->parsed()) return Show("POST", "/v1/hosts/" + name_ + "/undrain", nlohmann::json::object(), nullptr);
    if (vms_->parsed()) return Show("GET", "/v1/vms", nullptr, &Cluster::PrintVms);
    if (create_->parsed()) {
      nlohmann::json body = {{"name", name_}, {"kernel", kernel_}, {"mem", mem_}};
      if (!initrd_.empty()) body["initrd"] = initrd_;
      if (!cmdline_.empty()) body["cmdline"] = cmdline_;
      if (!host_.empty()) body["host"] = host_;
      return Show("POST", "/v1/vms", body, nullptr);
    }
    if (delete_->parsed()) return Show("DELETE", "/v1/vms/" + name_, nullptr, nullptr);
    if (console_->parsed()) {
      auto r = Call("GET", "/v1/vms/" + name_ + "/console", nullptr);
      if (!r) return Fail(r.error());
      std::fwrite(r->data(), 1, r->size(), stdout);
      return 0;
    }
    if (migrations_->parsed()) return Show("GET", "/v1/migrations", nullptr, &Cluster::PrintMigrations);
    if (events_->parsed()) return Show("GET", "/v1/events", nullptr, &Cluster::PrintEvents);
    if (plan_->parsed()) return Show("GET", "/v1/plan", nullptr, &Cluster::PrintPlan);
    return 2;
  }

 private:
  static int Fail(const Error& e) {
    std::fprintf(stderr, "ferry cluster: %s\n", e.message().c_str());
    return 1;
  }

  Result<std::string> Call(const std::string& method, const std::string& path, const nlohmann::json& body) {
    auto u = net::ParseHttpUrl(url_);
    if (!u) return std::unexpected(u.error().WithContext("--controller"));
    if (u->tls && (tls_.cert.empty() || tls_.key.empty() || tls_.ca.empty()))
      return Errorf(ErrorCode::kInvalidArgument, "{} is HTTPS: give --tls-cert, --tls-key and --tls-ca", url_);
    agent::AgentClient client(u->host, u->port, u->tls ? tls_ : net::TlsFiles{});
    auto r = client.Do(method, path, body.is_null() ? "" : body.dump(), std::chrono::seconds(60));
    if (!r) return std::unexpected(r.error());
    if (r->status < 200 || r->status >= 300) {
      auto j = nlohmann::json::parse(r->body, nullptr, false);
      const std::string why = j.is_object() && j.contains("error") && j["error"].is_string() ? j["error"].get<std::string>() : r->body;
      return Errorf(ErrorCode::kInvalidArgument, "{} (HTTP {})", why, r->status);
    }
    return std::move(r->body);
  }

  int Show(const std::string& method, const std::string& path, const nlohmann::json& body, void (Cluster::*print)(const nlohmann::json&)) {
    auto r = Call(method, path, body);
    if (!r) return Fail(r.error());
    auto j = nlohmann::json::parse(*r, nullptr, false);
    if (j.is_discarded()) return Fail(Error(ErrorCode::kIo, "the controller's answer is not JSON"));
    if (json_ || !print) std::printf("%s\n", j.dump(2).c_str());
    else (this->*print)(j);
    return 0;
  }

  void PrintHosts(const nlohmann::json& hosts) {
    std::printf("%-12s %-9s %-18s %-10s %s\n", "HOST", "STATE", "CPU", "MEM (GiB)", "VMS");
    for (const auto& h : hosts) {
      const auto cap = h.value("capacity", nlohmann::json::object()), use = h.value("usage", nlohmann::json::object());
      std::string vms;
      for (const auto& v : h.value("vms", nlohmann::json::array())) vms += (vms.empty() ? "" : ",") + v.get<std::string>();
      std::printf("%-12s %-9s %5.0f%% (%.2f/%g)  %-10.1f %s\n", Str(h, "name").c_str(), Str(h, "state").c_str(), Num(use, "cpu_load") * 100,
                  Num(use, "cpus"), Num(cap, "cpus"), Num(cap, "mem_bytes") / (1 << 30), vms.c_str());
    }
  }
  void PrintVms(const nlohmann::json& vms) {
    std::printf("%-16s %-12s %-10s %-8s %s\n", "VM", "HOST", "STATE", "MEM", "CPUS");
    for (const auto& v : vms)
      std::printf("%-16s %-12s %-10s %-8s %.2f%s\n", Str(v, "name").c_str(), Str(v, "host").c_str(), Str(v, "state").c_str(),
                  fmt::format("{}M", static_cast<uint64_t>(Num(v, "mem_bytes")) >> 20).c_str(),
                  Num(v.value("usage", nlohmann::json::object()), "cpus"), v.contains("error") ? ("  " + Str(v, "error")).c_str() : "");
  }
  void PrintMigrations(const nlohmann::json& ms) {
    std::printf("%-14s %-10s %-10s %-10s %9s %9s  %s\n", "VM", "FROM", "TO", "STATUS", "TOTAL ms", "DOWN ms", "REASON");
    for (const auto& m : ms)
      std::printf("%-14s %-10s %-10s %-10s %9.0f %9.1f  %s%s\n", Str(m, "vm").c_str(), Str(m, "from").c_str(), Str(m, "to").c_str(),
                  Str(m, "status").c_str(), Num(m, "total_ms"), Num(m, "downtime_ms"), Str(m, "reason").c_str(),
                  m.contains("error") ? (" - " + Str(m, "error")).c_str() : "");
  }
  void PrintEvents(const nlohmann::json& ev) {
    for (const auto& e : ev) std::printf("%-13.0f %-18s %s\n", Num(e, "at_ms"), Str(e, "kind").c_str(), Str(e, "text").c_str());
  }
  void PrintPlan(const nlohmann::json& p) {
    std::printf("%s; CPU imbalance %.3f -> %.3f, CPUs over the threshold %.2f -> %.2f\n", p.value("leader", false) ? "leader" : "standby",
                Num(p, "cpu_stddev"), Num(p, "cpu_stddev_after"), Num(p, "cpu_overload_cpus"), Num(p, "cpu_overload_cpus_after"));
    for (const auto& m : p.value("moves", nlohmann::json::array()))
      std::printf("move %s %s -> %s (expected %.0f ms, pause %.0f ms): %s\n", Str(m, "vm").c_str(), Str(m, "from").c_str(), Str(m, "to").c_str(),
                  Num(m, "expected_total_ms"), Num(m, "expected_downtime_ms"), Str(m, "reason").c_str());
    for (const auto& h : p.value("hotspots", nlohmann::json::array())) {
      std::printf("%s on %s%s: %.2f (threshold %.2f) for %.0f s\n", Str(h, "trigger").c_str(), Str(h, "host").c_str(),
                  Str(h, "vm").empty() ? "" : (" (" + Str(h, "vm") + ")").c_str(), Num(h, "value"), Num(h, "threshold"), Num(h, "held_s"));
      for (const auto& w : h.value("why_not", nlohmann::json::array())) std::printf("  - %s\n", w.get<std::string>().c_str());
    }
    if (p.value("moves", nlohmann::json::array()).empty() && p.value("hotspots", nlohmann::json::array()).empty()) std::printf("nothing to do\n");
  }

  std::string url_;
  net::TlsFiles tls_;
  bool json_ = false;
  std::string name_, agent_, kernel_, initrd_, mem_, cmdline_, host_;
  CLI::App *cmd_, *hosts_, *add_host_, *drain_, *undrain_, *vms_, *create_, *delete_, *console_, *migrations_, *events_, *plan_;
};

}  // namespace

std::unique_ptr<ClusterCommands> AddClusterCommands(CLI::App& app) { return std::make_unique<Cluster>(app); }

}  // namespace ferry::ctl
