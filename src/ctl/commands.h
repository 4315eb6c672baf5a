// The `ferry` operator CLI: subcommands over a VMM's API socket.
#pragma once

namespace ferry::ctl {

// Parses argv and runs one subcommand; returns the process exit code.
int RunCli(int argc, char** argv);

}  // namespace ferry::ctl
