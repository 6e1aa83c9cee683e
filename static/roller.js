/* roller dashboard: confirmations and live updates.  No framework; every
 * page works without it (destructive tasks then get a confirmation page).
 * Text from the server is only ever set with textContent. */
(function () {
  "use strict";

  // -- confirm destructive actions before the form is sent
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var button = ev.submitter || null;
    // forms acting on a selection (the fleet's batch form, the queue's "Cancel selected") need one
    var needs = form.getAttribute("data-needs");
    if (needs && !checkedIn(form, needs.split(" ")).length) {
      ev.preventDefault();
      setText(form.getAttribute("data-needs-status") || "", form.getAttribute("data-needs-message") || "Select something first.");
      return;
    }
    var message = (button && button.getAttribute("data-confirm")) || form.getAttribute("data-confirm");
    var confirmField = form.querySelector("input[name=confirm]");
    if (confirmField) { confirmField.value = ""; }
    if (!message) { return; }
    if (!window.confirm(message)) { ev.preventDefault(); return; }
    if (confirmField) { confirmField.value = "yes"; }
  });

  var FINAL = ["succeeded", "failed", "cancelled", "timed_out", "interrupted"];

  /* The checked checkboxes of a form (those outside it with form="id" too) named one of names. */
  function checkedIn(form, names) {
    return Array.prototype.filter.call(form.elements, function (el) {
      return el.type === "checkbox" && el.checked && !el.disabled && names.indexOf(el.name) >= 0;
    });
  }

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

  // -- the fleet page: select machines (a page, or every machine matching the filter) for a batch
  var batchForm = document.getElementById("batch-form");
  if (batchForm) {
    var pickPage = document.getElementById("pick-page");
    var allMatching = document.getElementById("all-matching");
    var rowBoxes = function () {
      return Array.prototype.filter.call(batchForm.elements, function (el) { return el.name === "m"; });
    };
    var countPicks = function () {
      var boxes = rowBoxes();
      var n = boxes.filter(function (el) { return el.checked; }).length;
      if (allMatching && allMatching.checked) {
        setText("pick-count", "All machines matching the filter are selected (" +
          allMatching.labels[0].textContent.replace(/[^0-9]/g, "") + ").");
      } else {
        setText("pick-count", n ? n + " selected." : "");
      }
      if (pickPage) {
        pickPage.checked = boxes.length > 0 && n === boxes.length;
        pickPage.indeterminate = n > 0 && n < boxes.length;
      }
    };
    if (pickPage) {
      pickPage.hidden = false;
      pickPage.addEventListener("change", function () {
        rowBoxes().forEach(function (el) { if (!el.disabled) { el.checked = pickPage.checked; } });
        countPicks();
      });
    }
    if (allMatching) {
      allMatching.addEventListener("change", function () {
        rowBoxes().forEach(function (el) {
          el.disabled = allMatching.checked;
          if (allMatching.checked) { el.checked = true; }
        });
        if (pickPage) { pickPage.disabled = allMatching.checked; }
        countPicks();
      });
    }
    batchForm.addEventListener("change", function (ev) { if (ev.target.name === "m") { countPicks(); } });
    batchForm.setAttribute("data-needs", "m all");
    batchForm.setAttribute("data-needs-status", "pick-count");
    batchForm.setAttribute("data-needs-message", "Tick machines first (or select all matching the filter).");
    countPicks();
  }

  // -- the queue page: "Cancel selected"
  var cancelMany = document.getElementById("cancel-selected");
  if (cancelMany) {
    cancelMany.setAttribute("data-needs", "job");
    cancelMany.setAttribute("data-needs-status", "cancel-count");
    cancelMany.setAttribute("data-needs-message", "Tick the jobs to cancel first.");
    document.addEventListener("change", function (ev) {
      if (ev.target.name !== "job") { return; }
      var n = checkedIn(cancelMany, ["job"]).length;
      setText("cancel-count", n ? n + " selected." : "Tick the jobs to cancel below.");
    });
  }

  // -- the batch page: progress, counts and members live over Server-Sent Events
  function setBadge(el, state) {
    if (!el) { return; }
    var badge = document.createElement("span");
    badge.className = "state state-" + state;
    badge.textContent = state.replace("_", " ");
    el.replaceChildren(badge);
  }

  var ACTIVE = ["pending", "queued", "running"];
  var batchBox = document.getElementById("batch");

  function applyBatch(b) {
    if (!b) { return; }
    setBadge(document.getElementById("batch-state"), b.state);
    var halt = document.getElementById("batch-halt");
    if (halt) { halt.textContent = b.halt_reason || ""; halt.hidden = !b.halt_reason; }
    var counts = b.counts || {};
    var done = b.total;
    Object.keys(counts).forEach(function (s) {
      if (ACTIVE.indexOf(s) >= 0) { done -= counts[s]; }
      var item = document.getElementById("count-" + s);
      if (item) {
        var strong = item.querySelector("strong");
        if (strong) { strong.textContent = String(counts[s]); }
        item.classList.toggle("zero", !counts[s]);
      }
    });
    var bar = document.getElementById("batch-progress");
    if (bar && b.total) { bar.max = b.total; bar.value = done; bar.textContent = Math.round(b.progress * 100) + "%"; }
    setText("batch-done", String(done));
    setText("batch-percent", Math.round(b.progress * 100) + "%");
    if (b.finished) { setTime("batch-finished", b.finished); }
    if (b.state !== "running") {
      var cancel = document.getElementById("batch-cancel");
      if (cancel) { cancel.remove(); }
    }
    document.title = document.title.replace(/\([a-z_]+\)/, "(" + b.state + ")");
  }

  function applyMember(mb) {
    var row = document.getElementById("member-" + mb.position);
    if (!row) { return; }
    setBadge(row.querySelector(".m-state"), mb.state);
    var jobCell = row.querySelector(".m-job");
    if (jobCell && mb.task_id) {
      var link = document.createElement("a");
      link.href = "/jobs/" + encodeURIComponent(mb.task_id);
      link.className = "nowrap";
      link.textContent = "…" + mb.task_id.slice(-8);
      var parts = [link];
      if (mb.joined) {
        var note = document.createElement("span");
        note.className = "muted";
        note.textContent = "(joined)";
        parts.push(document.createTextNode(" "), note);
      }
      jobCell.replaceChildren.apply(jobCell, parts);
    }
    var errorCell = row.querySelector(".m-error");
    if (errorCell) {
      if (mb.error) {
        var line = document.createElement("span");
        line.className = "error-line";
        line.textContent = mb.error.length > 165 ? mb.error.slice(0, 157) + "..." : mb.error;
        errorCell.replaceChildren(line);
      } else {
        errorCell.replaceChildren();
      }
    }
  }

  if (batchBox && batchBox.dataset.stream && window.EventSource) {
    var batchSource = new EventSource(batchBox.dataset.stream);
    batchSource.onopen = function () { setText("live-status", "Live: members update as they start and end."); };
    batchSource.onerror = function () {
      if (batchSource.readyState !== EventSource.CLOSED) { setText("live-status", "Connection lost; reconnecting…"); }
    };
    batchSource.onmessage = function (message) {
      var data;
      try { data = JSON.parse(message.data); } catch (e) { return; }
      if (!data.batch || data.batch.batch_id !== batchBox.dataset.batch) { return; }
      (data.members || []).forEach(applyMember);
      applyBatch(data.batch);
    };
    batchSource.addEventListener("end", function () {
      batchSource.close();
      var state = document.querySelector("#batch-state .state");
      setText("live-status", "Finished: " + (state ? state.textContent : "ended") + ".");
    });
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
