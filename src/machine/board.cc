#include "machine/board.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include <libfdt.h>
#include <spdlog/spdlog.h>

#include "common/json.h"
#include "machine/devices/virtio/virtio_factory.h"

namespace ferry {

std::string FormatMac(const MacAddress& m) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]);
}

Result<MacAddress> ParseMac(const std::string& s) {
  MacAddress m{};
  unsigned v[6];
  char extra;
  if (std::sscanf(s.c_str(), "%x:%x:%x:%x:%x:%x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &extra) != 6)
    return Errorf(ErrorCode::kInvalidArgument, "invalid MAC address '{}' (expected xx:xx:xx:xx:xx:xx)", s);
  for (int i = 0; i < 6; ++i) {
    if (v[i] > 0xff) return Errorf(ErrorCode::kInvalidArgument, "invalid MAC address '{}'", s);
    m[i] = static_cast<uint8_t>(v[i]);
  }
  if (m[0] & 1) return Errorf(ErrorCode::kInvalidArgument, "MAC address '{}' is multicast", s);
  return m;
}

nlohmann::json BoardConfig::GuestJson() const {
  nlohmann::json j;
  j["ram_bytes"] = ram_bytes;
  j["cmdline"] = cmdline;
  j["disk"] = !disk.empty();
  j["disk_read_only"] = disk_read_only;
  j["net"] = !tap.empty();
  if (mac) j["mac"] = FormatMac(*mac);
  j["balloon"] = balloon;
  return j;
}

Status BoardConfig::ApplyGuestJson(const nlohmann::json& j) {
  try {
    auto ram = JsonUint(j.at("ram_bytes"), "ram_bytes");
    if (!ram) return std::unexpected(ram.error());
    ram_bytes = *ram;
    cmdline = j.at("cmdline").get<std::string>();
    disk_read_only = j.value("disk_read_only", false);
    balloon = j.at("balloon").get<bool>();
    bool want_disk = j.at("disk").get<bool>(), want_net = j.at("net").get<bool>();
    if (want_disk && disk.empty())
      return Errorf(ErrorCode::kInvalidArgument, "the VM has a virtio-blk disk: pass --disk PATH for it");
    if (!want_disk && !disk.empty())
      return Errorf(ErrorCode::kInvalidArgument, "the VM has no disk, but --disk was given");
    if (want_net && tap.empty())
      return Errorf(ErrorCode::kInvalidArgument, "the VM has a virtio-net device: pass --net tap=NAME for it");
    if (!want_net && !tap.empty())
      return Errorf(ErrorCode::kInvalidArgument, "the VM has no network device, but --net was given");
    if (j.contains("mac")) {
      auto m = ParseMac(j["mac"].get<std::string>());
      if (!m) return std::unexpected(m.error());
      mac = *m;
    }
  } catch (const nlohmann::json::exception& e) {
    return Errorf(ErrorCode::kCorrupt, "bad VM configuration record: {}", e.what());
  }
  return {};
}

Board::~Board() = default;

Result<std::unique_ptr<Board>> Board::Create(const BoardConfig& config, bool load_kernel) {
  if (config.ram_bytes < kMinRam || config.ram_bytes > kMaxRam || config.ram_bytes % kPageSize)
    return Errorf(ErrorCode::kInvalidArgument, "RAM size {} must be a multiple of 4 KiB between 16 MiB and 64 GiB",
                  config.ram_bytes);
  std::unique_ptr<Board> b(new Board());
  b->config_ = config;
  auto s = b->Build(load_kernel);
  if (!s) return std::unexpected(s.error());
  return b;
}

Status Board::Build(bool load_kernel) {
  auto mem = GuestMemory::Create(kRamBase, config_.ram_bytes);
  if (!mem) return std::unexpected(mem.error().WithContext("create guest RAM"));
  memory_ = std::move(*mem);

  auto out = config_.console_out;
  clint_ = std::make_unique<Clint>();
  sbi_ = std::make_unique<Sbi>(out);
  VcpuEnv env{memory_.get(), &bus_, clint_.get(), sbi_.get()};
  vcpu_ = CreateRiscvVcpu(0, env);
  clint_->AttachHart(vcpu_.get());
  sbi_->AttachHart(vcpu_.get());
  plic_ = std::make_unique<Plic>(vcpu_.get());
  uart_ = std::make_unique<Uart>(plic_.get(), kUartIrq, out);
  bus_.Register(kClintBase, Clint::kSize, clint_.get(), "clint");
  bus_.Register(kPlicBase, Plic::kSize, plic_.get(), "plic");
  bus_.Register(kUartBase, 0x100, uart_.get(), "uart0");

  int slot = 0;
  auto add_virtio = [&](auto&& create, uint32_t device_id, const char* what) -> Status {
    VirtioDeps deps{memory_.get(), plic_.get(), kVirtioIrqBase + static_cast<uint32_t>(slot), config_.loop,
                    kVirtioBase + kVirtioStride * static_cast<uint64_t>(slot)};
    auto dev = create(deps);
    if (!dev) return std::unexpected(dev.error().WithContext(what));
    bus_.Register(deps.mmio_base, kVirtioStride, dev->get(), (*dev)->id());
    virtio_slots_.push_back({slot, device_id});
    virtio_.push_back(std::move(*dev));
    ++slot;
    return {};
  };
  if (!config_.disk.empty()) {
    FERRY_RETURN_IF_ERROR(add_virtio([&](const VirtioDeps& d) { return CreateVirtioBlk(d, config_.disk, config_.disk_read_only); }, 2, "virtio-blk"), "board");
  }
  if (!config_.tap.empty()) {
    if (!config_.mac) config_.mac = MacAddress{0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
    FERRY_RETURN_IF_ERROR(add_virtio([&](const VirtioDeps& d) { return CreateVirtioNet(d, config_.tap, *config_.mac); }, 1, "virtio-net"), "board");
    net_ = virtio_.back().get();
  }
  if (config_.balloon) {
    FERRY_RETURN_IF_ERROR(add_virtio([&](const VirtioDeps& d) { return CreateVirtioBalloon(d); }, 5, "virtio-balloon"), "board");
    balloon_ = virtio_.back().get();
  }

  uint64_t initrd_start = 0, initrd_end = 0;
  uint64_t entry = kRamBase + 0x200000;
  if (load_kernel) {
    uint64_t kernel_end;
    FERRY_RETURN_IF_ERROR(LoadKernel(&entry, &kernel_end), "load kernel");
    if (!config_.initrd.empty()) {
      std::ifstream f(config_.initrd, std::ios::binary);
      if (!f) return Errorf(ErrorCode::kNotFound, "cannot open initrd '{}'", config_.initrd);
      std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      uint64_t ram_end = kRamBase + config_.ram_bytes;
      // Like QEMU: half-way into RAM (at most 128 MiB past the kernel), above the kernel.
      uint64_t start = std::max(kernel_end, entry + std::min<uint64_t>(config_.ram_bytes / 2, 128ull << 20));
      start = (start + 0xfff) & ~0xfffull;
      if (start + data.size() + (4ull << 20) > ram_end) start = (ram_end - data.size() - (4ull << 20)) & ~0xfffull;
      if (start < kernel_end || start + data.size() > ram_end - (2ull << 20))
        return Errorf(ErrorCode::kInvalidArgument, "initrd '{}' ({} bytes) does not fit in {} MiB of RAM",
                      config_.initrd, data.size(), config_.ram_bytes >> 20);
      FERRY_RETURN_IF_ERROR(memory_->Write(start, data.data(), data.size()), "load initrd");
      initrd_start = start;
      initrd_end = start + data.size();
    }
  }
  FERRY_RETURN_IF_ERROR(BuildFdt(initrd_start, initrd_end), "device tree");
  if (load_kernel) {
    uint64_t fdt_addr = (kRamBase + config_.ram_bytes - fdt_.size() - 0x1000) & ~0x1fffffull;
    if (fdt_addr < initrd_end) fdt_addr = (kRamBase + config_.ram_bytes - fdt_.size()) & ~0xfffull;
    FERRY_RETURN_IF_ERROR(memory_->Write(fdt_addr, fdt_.data(), fdt_.size()), "load device tree");
    vcpu_->SetBootState(entry, 0, fdt_addr, 1);
    spdlog::info("board: kernel at {:#x}, initrd [{:#x}, {:#x}), fdt at {:#x}, {} MiB RAM", entry, initrd_start,
                 initrd_end, fdt_addr, config_.ram_bytes >> 20);
  }
  return {};
}

Status Board::LoadKernel(uint64_t* entry, uint64_t* kernel_end) {
  std::ifstream f(config_.kernel, std::ios::binary);
  if (!f) return Errorf(ErrorCode::kNotFound, "cannot open kernel '{}'", config_.kernel);
  std::vector<char> data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (data.size() < 64 || std::memcmp(data.data() + 56, "RSC\x05", 4) != 0)
    return Errorf(ErrorCode::kInvalidArgument, "'{}' is not a RISC-V Linux Image (no 'RSC\\x05' magic at offset 56)",
                  config_.kernel);
  uint64_t text_offset, image_size;
  std::memcpy(&text_offset, data.data() + 8, 8);
  std::memcpy(&image_size, data.data() + 16, 8);
  if (text_offset == 0) text_offset = 0x200000;
  if (text_offset % kPageSize || text_offset > config_.ram_bytes / 2)
    return Errorf(ErrorCode::kInvalidArgument, "kernel text_offset {:#x} is unusable", text_offset);
  uint64_t load = kRamBase + text_offset;
  uint64_t span = std::max<uint64_t>(image_size, data.size());
  if (span > config_.ram_bytes - text_offset - (8ull << 20))
    return Errorf(ErrorCode::kInvalidArgument, "kernel ({} bytes) does not fit in {} MiB of RAM", span,
                  config_.ram_bytes >> 20);
  FERRY_RETURN_IF_ERROR(memory_->Write(load, data.data(), data.size()), "copy kernel");
  *entry = load;
  *kernel_end = load + ((span + 0x1fffff) & ~0x1fffffull);
  return {};
}

#define FDT_OK(expr)                                                                      \
  do {                                                                                    \
    int fdt_rc_ = (expr);                                                                 \
    if (fdt_rc_ < 0) return Errorf(ErrorCode::kInternal, "libfdt: {}: {}", #expr, fdt_strerror(fdt_rc_)); \
  } while (0)

Status Board::BuildFdt(uint64_t initrd_start, uint64_t initrd_end) {
  std::vector<uint8_t> buf(64 * 1024);
  void* fdt = buf.data();
  auto reg = [&](uint64_t base, uint64_t size) {
    return std::array<fdt64_t, 2>{cpu_to_fdt64(base), cpu_to_fdt64(size)};
  };
  FDT_OK(fdt_create(fdt, static_cast<int>(buf.size())));
  FDT_OK(fdt_finish_reservemap(fdt));
  FDT_OK(fdt_begin_node(fdt, ""));
  FDT_OK(fdt_property_u32(fdt, "#address-cells", 2));
  FDT_OK(fdt_property_u32(fdt, "#size-cells", 2));
  FDT_OK(fdt_property_string(fdt, "compatible", "riscv-virtio"));
  FDT_OK(fdt_property_string(fdt, "model", "riscv-virtio,qemu"));

  FDT_OK(fdt_begin_node(fdt, "chosen"));
  FDT_OK(fdt_property_string(fdt, "bootargs", config_.cmdline.c_str()));
  FDT_OK(fdt_property_string(fdt, "stdout-path", "/soc/serial@10000000"));
  if (initrd_end > initrd_start) {
    FDT_OK(fdt_property_u64(fdt, "linux,initrd-start", initrd_start));
    FDT_OK(fdt_property_u64(fdt, "linux,initrd-end", initrd_end));
  }
  FDT_OK(fdt_end_node(fdt));

  FDT_OK(fdt_begin_node(fdt, fmt::format("memory@{:x}", kRamBase).c_str()));
  FDT_OK(fdt_property_string(fdt, "device_type", "memory"));
  auto mreg = reg(kRamBase, config_.ram_bytes);
  FDT_OK(fdt_property(fdt, "reg", mreg.data(), sizeof mreg));
  FDT_OK(fdt_end_node(fdt));

  constexpr uint32_t kCpuIntc = 1, kPlicPhandle = 2;
  FDT_OK(fdt_begin_node(fdt, "cpus"));
  FDT_OK(fdt_property_u32(fdt, "#address-cells", 1));
  FDT_OK(fdt_property_u32(fdt, "#size-cells", 0));
  FDT_OK(fdt_property_u32(fdt, "timebase-frequency", static_cast<uint32_t>(Clint::kFrequency)));
  FDT_OK(fdt_begin_node(fdt, "cpu@0"));
  FDT_OK(fdt_property_string(fdt, "device_type", "cpu"));
  FDT_OK(fdt_property_u32(fdt, "reg", 0));
  FDT_OK(fdt_property_string(fdt, "status", "okay"));
  FDT_OK(fdt_property_string(fdt, "compatible", "riscv"));
  FDT_OK(fdt_property_string(fdt, "riscv,isa", "rv64imafdc_zicsr_zifencei"));
  FDT_OK(fdt_property_string(fdt, "mmu-type", "riscv,sv48"));
  FDT_OK(fdt_begin_node(fdt, "interrupt-controller"));
  FDT_OK(fdt_property_u32(fdt, "#interrupt-cells", 1));
  FDT_OK(fdt_property(fdt, "interrupt-controller", nullptr, 0));
  FDT_OK(fdt_property_string(fdt, "compatible", "riscv,cpu-intc"));
  FDT_OK(fdt_property_u32(fdt, "phandle", kCpuIntc));
  FDT_OK(fdt_end_node(fdt));
  FDT_OK(fdt_end_node(fdt));
  FDT_OK(fdt_end_node(fdt));

  FDT_OK(fdt_begin_node(fdt, "soc"));
  FDT_OK(fdt_property_u32(fdt, "#address-cells", 2));
  FDT_OK(fdt_property_u32(fdt, "#size-cells", 2));
  FDT_OK(fdt_property_string(fdt, "compatible", "simple-bus"));
  FDT_OK(fdt_property(fdt, "ranges", nullptr, 0));

  FDT_OK(fdt_begin_node(fdt, fmt::format("clint@{:x}", kClintBase).c_str()));
  const char clint_compat[] = "sifive,clint0\0riscv,clint0";
  FDT_OK(fdt_property(fdt, "compatible", clint_compat, sizeof clint_compat));
  auto creg = reg(kClintBase, Clint::kSize);
  FDT_OK(fdt_property(fdt, "reg", creg.data(), sizeof creg));
  fdt32_t cint[] = {cpu_to_fdt32(kCpuIntc), cpu_to_fdt32(3), cpu_to_fdt32(kCpuIntc), cpu_to_fdt32(7)};
  FDT_OK(fdt_property(fdt, "interrupts-extended", cint, sizeof cint));
  FDT_OK(fdt_end_node(fdt));

  FDT_OK(fdt_begin_node(fdt, fmt::format("plic@{:x}", kPlicBase).c_str()));
  const char plic_compat[] = "sifive,plic-1.0.0\0riscv,plic0";
  FDT_OK(fdt_property(fdt, "compatible", plic_compat, sizeof plic_compat));
  auto preg = reg(kPlicBase, Plic::kSize);
  FDT_OK(fdt_property(fdt, "reg", preg.data(), sizeof preg));
  fdt32_t pint[] = {cpu_to_fdt32(kCpuIntc), cpu_to_fdt32(11), cpu_to_fdt32(kCpuIntc), cpu_to_fdt32(9)};
  FDT_OK(fdt_property(fdt, "interrupts-extended", pint, sizeof pint));
  FDT_OK(fdt_property(fdt, "interrupt-controller", nullptr, 0));
  FDT_OK(fdt_property_u32(fdt, "#interrupt-cells", 1));
  FDT_OK(fdt_property_u32(fdt, "#address-cells", 0));
  FDT_OK(fdt_property_u32(fdt, "riscv,ndev", Plic::kSources - 1));
  FDT_OK(fdt_property_u32(fdt, "phandle", kPlicPhandle));
  FDT_OK(fdt_end_node(fdt));

  FDT_OK(fdt_begin_node(fdt, fmt::format("serial@{:x}", kUartBase).c_str()));
  FDT_OK(fdt_property_string(fdt, "compatible", "ns16550a"));
  auto ureg = reg(kUartBase, 0x100);
  FDT_OK(fdt_property(fdt, "reg", ureg.data(), sizeof ureg));
  FDT_OK(fdt_property_u32(fdt, "clock-frequency", 0x384000));
  FDT_OK(fdt_property_u32(fdt, "interrupts", kUartIrq));
  FDT_OK(fdt_property_u32(fdt, "interrupt-parent", kPlicPhandle));
  FDT_OK(fdt_end_node(fdt));

  for (const VirtioSlot& s : virtio_slots_) {
    uint64_t base = kVirtioBase + kVirtioStride * static_cast<uint64_t>(s.slot);
    FDT_OK(fdt_begin_node(fdt, fmt::format("virtio_mmio@{:x}", base).c_str()));
    FDT_OK(fdt_property_string(fdt, "compatible", "virtio,mmio"));
    auto vreg = reg(base, kVirtioStride);
    FDT_OK(fdt_property(fdt, "reg", vreg.data(), sizeof vreg));
    FDT_OK(fdt_property_u32(fdt, "interrupts", kVirtioIrqBase + static_cast<uint32_t>(s.slot)));
    FDT_OK(fdt_property_u32(fdt, "interrupt-parent", kPlicPhandle));
    FDT_OK(fdt_end_node(fdt));
  }
  FDT_OK(fdt_end_node(fdt));  // soc
  FDT_OK(fdt_end_node(fdt));  // root
  FDT_OK(fdt_finish(fdt));
  buf.resize(fdt_totalsize(fdt));
  fdt_ = std::move(buf);
  return {};
}

std::vector<Device*> Board::devices() {
  std::vector<Device*> d{clint_.get(), sbi_.get(), plic_.get(), uart_.get()};
  for (auto& v : virtio_) d.push_back(v.get());
  return d;
}

Device* Board::FindDevice(const std::string& id) {
  for (Device* d : devices())
    if (d->id() == id) return d;
  return nullptr;
}

Status Board::RestoreDevices(const std::map<std::string, std::vector<uint8_t>>& blobs) {
  for (Device* d : devices()) {
    auto it = blobs.find(d->id());
    if (it == blobs.end()) return Errorf(ErrorCode::kCorrupt, "no saved state for device '{}'", d->id());
    FERRY_RETURN_IF_ERROR(d->RestoreState(it->second), fmt::format("device '{}'", d->id()));
  }
  for (const auto& [id, blob] : blobs)
    if (!FindDevice(id)) return Errorf(ErrorCode::kCorrupt, "saved state for unknown device '{}'", id);
  return {};
}

void Board::PostRestore() {
  for (Device* d : devices()) d->PostRestore();
}

}  // namespace ferry
