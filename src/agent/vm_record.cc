#include "agent/vm_record.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <set>

#include "common/json.h"
#include "common/size.h"

namespace ferry::agent {
namespace {

Result<std::string> StringField(const nlohmann::json& j, const char* key, bool required) {
  if (!j.contains(key)) {
    if (required) return Errorf(ErrorCode::kInvalidArgument, "\"{}\" is required", key);
    return std::string();
  }
  if (!j[key].is_string()) return Errorf(ErrorCode::kInvalidArgument, "\"{}\" must be a string", key);
  std::string v = j[key].get<std::string>();
  if (v.find('\0') != std::string::npos || v.size() > 4096)
    return Errorf(ErrorCode::kInvalidArgument, "\"{}\" holds a NUL byte or is longer than 4096 bytes", key);
  return v;
}

Status MustExist(const std::string& what, const std::string& path) {
  struct stat st;
  if (path.empty()) return {};
  if (path[0] != '/') return Errorf(ErrorCode::kInvalidArgument, "\"{}\": '{}' is not an absolute path", what, path);
  if (stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    return Errorf(ErrorCode::kInvalidArgument, "\"{}\": '{}' is not a file on this host", what, path);
  return {};
}

}  // namespace

Status CheckVmName(const std::string& n) {
  if (n.empty() || n.size() > 63) return Errorf(ErrorCode::kInvalidArgument, "VM name must have 1 to 63 characters");
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-'))
      return Errorf(ErrorCode::kInvalidArgument, "VM name '{}': only letters, digits, '.', '_' and '-'", n);
  if (n[0] == '.' || n[0] == '-') return Errorf(ErrorCode::kInvalidArgument, "VM name '{}' must not start with '.' or '-'", n);
  return {};
}

Result<VmSpec> VmSpecFromJson(const nlohmann::json& j, bool incoming) {
  if (!j.is_object()) return Errorf(ErrorCode::kInvalidArgument, "the body must be a JSON object");
  const std::set<std::string> allowed = incoming ? std::set<std::string>{"name", "mem", "net"}
                                                 : std::set<std::string>{"name", "kernel", "initrd", "cmdline", "mem", "net", "disk"};
  for (const auto& [k, v] : j.items())
    if (!allowed.contains(k))
      return Errorf(ErrorCode::kInvalidArgument, "unknown field \"{}\"{}", k,
                    incoming ? " (an incoming VM's kernel, command line and disk come with the migration)" : "");
  VmSpec s;
  auto take = [&](const char* key, bool required, std::string* out) -> Status {
    auto v = StringField(j, key, required);
    if (!v) return std::unexpected(v.error());
    *out = *v;
    return {};
  };
  FERRY_RETURN_IF_ERROR(take("name", true, &s.name), "bad request");
  FERRY_RETURN_IF_ERROR(CheckVmName(s.name), "bad request");
  if (!incoming) {
    FERRY_RETURN_IF_ERROR(take("kernel", true, &s.kernel), "bad request");
    FERRY_RETURN_IF_ERROR(take("initrd", false, &s.initrd), "bad request");
    FERRY_RETURN_IF_ERROR(take("cmdline", false, &s.cmdline), "bad request");
    FERRY_RETURN_IF_ERROR(take("disk", false, &s.disk), "bad request");
    FERRY_RETURN_IF_ERROR(MustExist("kernel", s.kernel), "bad request");
    FERRY_RETURN_IF_ERROR(MustExist("initrd", s.initrd), "bad request");
    FERRY_RETURN_IF_ERROR(MustExist("disk", s.disk), "bad request");
  }
  if (j.contains("mem")) FERRY_RETURN_IF_ERROR(take("mem", true, &s.mem), "bad request");
  auto mem = ParseSize(s.mem);
  if (!mem) return std::unexpected(mem.error().WithContext("bad request: \"mem\""));
  if (*mem < (16u << 20)) return Errorf(ErrorCode::kInvalidArgument, "bad request: \"mem\" {} is below 16 MiB", s.mem);
  s.mem_bytes = *mem;
  if (j.contains("net")) {
    const auto& n = j["net"];
    if (!n.is_object()) return Errorf(ErrorCode::kInvalidArgument, "bad request: \"net\" must be an object {{\"tap\", \"mac\"}}");
    for (const auto& [k, v] : n.items())
      if (k != "tap" && k != "mac") return Errorf(ErrorCode::kInvalidArgument, "bad request: unknown field \"net.{}\"", k);
    auto tap = StringField(n, "tap", true);
    if (!tap) return std::unexpected(tap.error().WithContext("bad request: net"));
    auto mac = StringField(n, "mac", false);
    if (!mac) return std::unexpected(mac.error().WithContext("bad request: net"));
    if (tap->empty() || tap->size() > 15 || tap->find_first_of("/ ,=") != std::string::npos)
      return Errorf(ErrorCode::kInvalidArgument, "bad request: net.tap '{}' is not an interface name", *tap);
    if (mac->find_first_of(" ,=") != std::string::npos) return Errorf(ErrorCode::kInvalidArgument, "bad request: net.mac '{}'", *mac);
    s.tap = *tap;
    s.mac = *mac;
  }
  return s;
}

nlohmann::json VmSpecToJson(const VmSpec& s) {
  nlohmann::json j = {{"name", s.name}, {"mem", s.mem}};
  if (!s.kernel.empty()) j["kernel"] = s.kernel;
  if (!s.initrd.empty()) j["initrd"] = s.initrd;
  if (!s.cmdline.empty()) j["cmdline"] = s.cmdline;
  if (!s.disk.empty()) j["disk"] = s.disk;
  if (!s.tap.empty()) {
    j["net"] = {{"tap", s.tap}};
    if (!s.mac.empty()) j["net"]["mac"] = s.mac;
  }
  return j;
}

nlohmann::json VmRecordToJson(const VmRecord& r) {
  nlohmann::json j = {{"spec", VmSpecToJson(r.spec)}, {"pid", r.pid}, {"start_ticks", r.start_ticks}};
  if (!r.incoming.empty()) j["incoming"] = r.incoming;
  return j;
}

Result<VmRecord> VmRecordFromJson(const nlohmann::json& j) {
  if (!j.is_object() || !j.contains("spec") || !j.contains("pid") || !j.contains("start_ticks") ||
      !j["pid"].is_number_integer() || !j["start_ticks"].is_number_unsigned())
    return Errorf(ErrorCode::kCorrupt, "vm.json: needs \"spec\", integer \"pid\" and \"start_ticks\"");
  VmRecord r;
  const bool incoming = j.contains("incoming");
  // A record keeps what was asked; the files it names may be gone since, which does not undo the VM.
  const nlohmann::json& spec = j["spec"];
  if (!spec.is_object()) return Errorf(ErrorCode::kCorrupt, "vm.json: \"spec\" is not an object");
  for (const char* key : {"name", "kernel", "initrd", "cmdline", "mem", "disk"})
    if (spec.contains(key) && !spec[key].is_string()) return Errorf(ErrorCode::kCorrupt, "vm.json: spec.{} is not a string", key);
  r.spec.name = spec.value("name", "");
  if (auto c = CheckVmName(r.spec.name); !c) return std::unexpected(c.error().WithContext("vm.json"));
  r.spec.kernel = spec.value("kernel", "");
  r.spec.initrd = spec.value("initrd", "");
  r.spec.cmdline = spec.value("cmdline", "");
  r.spec.disk = spec.value("disk", "");
  r.spec.mem = spec.value("mem", "256M");
  auto mem = ParseSize(r.spec.mem);
  if (!mem) return std::unexpected(mem.error().WithContext("vm.json: spec.mem"));
  r.spec.mem_bytes = *mem;
  if (spec.contains("net") && spec["net"].is_object()) {
    r.spec.tap = spec["net"].value("tap", "");
    r.spec.mac = spec["net"].value("mac", "");
  }
  r.pid = j["pid"].get<int>();
  r.start_ticks = j["start_ticks"].get<uint64_t>();
  if (incoming) {
    if (!j["incoming"].is_string()) return Errorf(ErrorCode::kCorrupt, "vm.json: \"incoming\" is not a string");
    r.incoming = j["incoming"].get<std::string>();
  }
  return r;
}

Status SaveVmRecord(const std::string& dir, const VmRecord& r) {
  const std::string path = dir + "/vm.json", tmp = path + ".tmp";
  const std::string text = VmRecordToJson(r).dump(2) + "\n";
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("create " + tmp);
  const bool ok = write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && fsync(fd) == 0;
  auto err = ok ? Status{} : ErrnoError("write " + tmp);
  close(fd);
  if (!ok) return err;
  if (rename(tmp.c_str(), path.c_str()) != 0) return ErrnoError("rename " + tmp);
  return {};
}

Result<VmRecord> LoadVmRecord(const std::string& dir) {
  auto text = ReadSmallFile(dir + "/vm.json", 64 * 1024);
  if (!text) return std::unexpected(text.error());
  auto j = ParseJson(*text, dir + "/vm.json", ErrorCode::kCorrupt);
  if (!j) return std::unexpected(j.error());
  auto r = VmRecordFromJson(*j);
  if (!r) return std::unexpected(r.error().WithContext(dir));
  return r;
}

Liveness CheckLiveness(const VmRecord& r, const std::optional<PidStat>& now) {
  if (!now || now->state == 'Z' || now->state == 'X') return Liveness::kGone;
  if (now->start_ticks != r.start_ticks) return Liveness::kPidReused;
  return Liveness::kRunning;
}

Result<std::string> TailFile(const std::string& path, size_t max_bytes) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return std::string();
    return ErrnoError("open " + path);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    auto e = ErrnoError("stat " + path);
    close(fd);
    return e;
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint64_t from = size > max_bytes ? size - max_bytes : 0;
  std::string out(static_cast<size_t>(size - from), '\0');
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t n = pread(fd, out.data() + got, out.size() - got, static_cast<off_t>(from + got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  close(fd);
  out.resize(got);
  return out;
}

Result<bool> BoundFile(const std::string& path, uint64_t max_bytes, size_t keep_bytes) {
  const int fd = open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return false;
    return ErrnoError("open " + path);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) <= max_bytes) {
    close(fd);
    return false;
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  // COLLAPSE_RANGE wants a multiple of the filesystem block: drop whole blocks, keep at least keep_bytes.
  const uint64_t block = st.st_blksize > 0 ? static_cast<uint64_t>(st.st_blksize) : 4096;
  const uint64_t drop = (size - keep_bytes) / block * block;
  if (drop > 0 && fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, static_cast<off_t>(drop)) == 0) {
    close(fd);
    return true;
  }
  close(fd);
  auto tail = TailFile(path, keep_bytes);
  if (!tail) return std::unexpected(tail.error());
  const int wfd = open(path.c_str(), O_WRONLY | O_TRUNC | O_CLOEXEC);
  if (wfd < 0) return ErrnoError("truncate " + path);
  const bool ok = write(wfd, tail->data(), tail->size()) == static_cast<ssize_t>(tail->size());
  close(wfd);
  if (!ok) return ErrnoError("write " + path);
  return true;
}

}  // namespace ferry::agent
