// Follows a job's logs on its page: each open rank's <pre data-url> asks the web view for
// what was written since its last offset, once a second, until the log will not grow.
// Text is appended as text (never as HTML): a log can hold anything.
(function () {
  "use strict";
  var POLL_MS = 1000;

  function follow(pre) {
    var offset = 0;
    var status = document.getElementById(pre.dataset.status);
    var details = pre.closest("details");
    function say(text) { if (status) { status.textContent = text; } }
    function again(ms) { window.setTimeout(tick, ms); }
    function tick() {
      if (details && !details.open) { again(POLL_MS); return; }
      fetch(pre.dataset.url + "&offset=" + offset, {credentials: "same-origin", headers: {Accept: "application/json"}})
        .then(function (r) {
          if (r.status === 401) { say("logged out: reload the page"); return null; }
          if (!r.ok) {
            return r.text().then(function (t) { say("error " + r.status + ": " + t.slice(0, 300)); again(5 * POLL_MS); return null; });
          }
          return r.json();
        })
        .then(function (c) {
          if (!c) { return; }
          if (c.data) {
            var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
            pre.appendChild(document.createTextNode(c.data));
            if (atEnd) { pre.scrollTop = pre.scrollHeight; }
          }
          var grew = c.next_offset > offset;
          offset = c.next_offset;
          if (c.eof) { say(offset ? "complete" : "empty"); return; }
          say("following…");
          again(grew ? 50 : POLL_MS);
        })
        .catch(function (e) { say("cannot reach the server (" + e + "), retrying"); again(5 * POLL_MS); });
    }
    tick();
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("pre.logtext[data-url]").forEach(follow);
  });
})();
