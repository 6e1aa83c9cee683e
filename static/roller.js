/* roller dashboard: confirmations and live updates.  No framework; every
 * page works without it (destructive tasks then get a confirmation page).
 * Text from the server is only ever set with textContent. */
(function () {
  "use strict";

  // -- confirm destructive actions before the form is sent
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var button = ev.submitter || null;
    var message = (button && button.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    var confirmField = form.querySelector("input[name=confirm]");
    if (confirmField) { confirmField.value = ""; }
    if (!message) { return; }
    if (!window.confirm(message)) { ev.preventDefault(); return; }
    if (confirmField) { confirmField.value = "yes"; }
  });

  var FINAL = ["succeeded", "failed", "cancelled", "timed_out", "interrupted"];

  function outcomeText(job) {
    switch (job.state) {
      case "queued": return "Waiting in the queue: it starts when the machine and its power/BMC endpoints are free.";
      case "running": return "Running now; the log below updates live.";
      case "succeeded": return job.result ? "Succeeded: " + job.result : "Succeeded.";
      case "failed": return job.error ? "Failed: " + job.error : "Failed, without a reason recorded.";
      case "timed_out": return "Gave up: the job " + (job.error || "timed out") + ", and was stopped.";
      case "cancelled": return job.error ? "Cancelled (" + job.error + ")." : "Cancelled.";
      case "interrupted": return "Interrupted: roller stopped while this job was running, so its outcome is unknown.";
      default: return job.state;
    }
  }

  function setText(id, text) {
    var el = document.getElementById(id);
    if (el) { el.textContent = text; }
  }

  function setTime(id, iso) {
    var el = document.getElementById(id);
    if (!el) { return; }
    var time = document.createElement("time");
    time.dateTime = iso;
    time.title = iso;
    time.textContent = iso.slice(0, 19).replace("T", " ");
    el.replaceChildren(time);
  }

  // -- the job page: append events as they happen
  var timeline = document.getElementById("timeline");
  if (timeline && timeline.dataset.stream && window.EventSource) {
    var source = new EventSource(timeline.dataset.stream);
    source.onopen = function () { setText("live-status", "Live: new lines appear as they happen."); };
    source.onerror = function () {
      if (source.readyState !== EventSource.CLOSED) { setText("live-status", "Connection lost; reconnecting…"); }
    };
    source.addEventListener("reset", function () {
      setText("live-status", "Some updates were missed; reloading the page…");
      source.close();
      window.location.reload();
    });
    source.onmessage = function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (e) { return; }
      var event = data.event, job = data.job;
      if (!event || !job || job.task_id !== timeline.dataset.job) { return; }
      var empty = document.getElementById("timeline-empty");
      if (empty) { empty.remove(); }
      var item = document.createElement("li");
      item.className = "ev ev-" + (event.kind === "state" ? "state" : "log");
      var time = document.createElement("time");
      time.dateTime = event.time || "";
      time.textContent = (event.time || "").slice(11, 19);
      var text = document.createElement("span");
      text.className = "msg";
      text.textContent = event.message;
      item.appendChild(time);
      item.appendChild(document.createTextNode(" "));
      item.appendChild(text);
      timeline.appendChild(item);
      if (event.kind === "state") {
        var badge = document.querySelector("#job-state .state");
        if (badge) {
          badge.className = "state state-" + job.state;
          badge.textContent = job.state.replace("_", " ");
        }
        var outcome = document.getElementById("job-outcome");
        if (outcome) {
          outcome.className = "outcome outcome-" + job.state;
          outcome.textContent = outcomeText(job);
        }
        document.title = document.title.replace(/\([a-z_]+\)/, "(" + job.state + ")");
        if (job.started) { setTime("job-started", job.started); }
        if (job.finished) { setTime("job-finished", job.finished); }
        if (FINAL.indexOf(job.state) >= 0) {
          var cancel = document.getElementById("job-cancel");
          if (cancel) { cancel.remove(); }
          source.close();
          setText("live-status", "Finished: " + job.state.replace("_", " ") + ".");
        }
      }
    };
  }

  // -- the queue page: say when it is out of date (no surprise reloads)
  var queueLive = document.getElementById("queue-live");
  if (queueLive && queueLive.dataset.stream && window.EventSource) {
    var queueSource = new EventSource(queueLive.dataset.stream);
    queueSource.onmessage = function () {
      queueLive.hidden = false;
      queueSource.close();
    };
  }
})();
