// ferry: the operator's CLI (see src/ctl).
#include "ctl/commands.h"

int main(int argc, char** argv) { return ferry::ctl::RunCli(argc, argv); }
