// The controller's web page (GET /): hosts with CPU and memory bars, VMs, running and past
// migrations with their reason and downtime, the planner's current view (GET /v1/plan) - all
// refreshed every second from the JSON API by the page's own script. One self-contained HTML
// document (no external resources: the page works on a cluster without internet access).
#pragma once

#include <string_view>

namespace ferry::controller {

std::string_view WebPage();

}  // namespace ferry::controller
