// Live updates for the gitops-agent page: the only script, and optional (every page works
// without it). It listens to the agent's event stream (/events) and, when a pass starts or
// ends, a unit finishes or a revision is rejected, fetches the page it shows again and
// swaps in its <main>: the server renders everything, this only asks it when to.
(function () {
  "use strict";
  var body = document.body;
  var badge = document.getElementById("live");
  if (!window.EventSource || !window.fetch || body.dataset.live !== "yes") return;
  var timer = null;
  var again = false;
  var busy = false;

  function show(text, on) {
    badge.textContent = text;
    badge.className = on ? "live on" : "live off";
  }

  function refresh() {
    timer = null;
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var current = document.getElementById("main");
        if (fresh && current) current.replaceWith(document.importNode(fresh, true));
        body.dataset.updated = String(Date.now()); // bench/web_pages.py reads these
      })
      .catch(function () { show("live (refresh failed)", false); })
      .then(function () {
        busy = false;
        if (again) { again = false; schedule(); }
      });
  }

  function schedule() {
    if (timer === null) timer = window.setTimeout(refresh, 100);
  }

  var source = new EventSource("/events");
  source.onopen = function () { show("live", true); };
  source.onerror = function () { show("reconnecting", false); };
  ["pass-started", "unit-started", "unit-finished", "pass-finished", "rejected"].forEach(
    function (name) {
      source.addEventListener(name, function (event) {
        body.dataset.lastEvent = name;
        body.dataset.receivedAt = String(Date.now());
        try { body.dataset.lastEventAt = String(JSON.parse(event.data).at); } catch (e) { /* */ }
        schedule();
      });
    }
  );
})();
