// OpenCode plugin: remembers what happens in a project through memory_manager.py.
//
// Stores (queued, detached, never blocking the agent, never throwing into OpenCode):
//   file.edited     "Edited <path>"
//   session.error   "Session error: <name>: <message>"
//   a completed turn (session.idle): what the user asked and which tools ran
// Recall: the first model call of a session gets the memories relevant to the user's first
// message added to its system prompt (experimental.chat.system.transform; pinned to OpenCode
// 1.18.33). The agent can always recall mid-task through the MCP server's search_memory_facts.
//
// One memory group per project: the normalised git remote URL (so a fresh clone finds its old
// memories and two projects never share them), else the directory; MEMORY_GROUP_ID overrides. The
// MCP server started in the project directory serves the same group. The group is logged at start.
//
// Failures are loud, never fatal: a memory manager that cannot run (a Python without its
// dependencies, a wrong path) is found once at start and logged as an error in OpenCode's log
// (service "memory"), and so is every store or recall that fails, with the manager's own one line.
//
// Environment: MEMORY_MANAGER (default: the `memory-manager` console script, whose Python has the
// dependencies; or a path to memory_manager.py, run with MEMORY_PYTHON, default python3),
// MEMORY_GROUP_ID, MEMORY_RECALL (on/off, default on), MEMORY_RECALL_TIMEOUT_MS (default 3000),
// MEMORY_RECALL_BUDGET_TOKENS (default 1500),
// plus the memory manager's own variables, which its processes inherit. No npm dependencies.

import { execFile, spawn } from "node:child_process"
import path from "node:path"

const MANAGER = process.env.MEMORY_MANAGER || "memory-manager"
const COMMAND = MANAGER.endsWith(".py") ? [process.env.MEMORY_PYTHON || "python3", MANAGER] : [MANAGER]
const RECALL = (process.env.MEMORY_RECALL || "on") !== "off"
const RECALL_TIMEOUT_MS = Number(process.env.MEMORY_RECALL_TIMEOUT_MS || 3000)
const RECALL_BUDGET_TOKENS = Number(process.env.MEMORY_RECALL_BUDGET_TOKENS || 1500)
const MAX_CONTENT = 8000 // characters per stored event: a concise note, not a transcript

// Runs the memory manager; resolves to {ok, stdout, why} and never rejects. `why` is the manager's
// one error line, or what kept it from running.
function manage(args, options = {}) {
  return new Promise((resolve) => {
    try {
      execFile(COMMAND[0], [...COMMAND.slice(1), ...args], { encoding: "utf8", ...options }, (error, stdout, stderr) => {
        if (!error) return resolve({ ok: true, stdout })
        const said = String(stderr || "").trim().split("\n").pop()
        const why = said || (error.killed ? `no answer within ${options.timeout} ms` : error.code || error.message)
        resolve({ ok: false, stdout: "", why: `${COMMAND.join(" ")} ${args[0]}: ${why}` })
      })
    } catch (error) {
      resolve({ ok: false, stdout: "", why: `${COMMAND.join(" ")} ${args[0]}: ${error.message}` })
    }
  })
}

// The plugin is the file's only export: OpenCode calls every exported function as a plugin.
export const MemoryPlugin = async ({ client, directory, worktree }) => {
  const root = worktree || directory
  const log = async (level, message) => {
    try {
      await client?.app?.log?.({ body: { service: "memory", level, message } })
    } catch {}
  }
  // The project's group, by the memory manager's own rule (`memory-manager group DIR`: the
  // normalised git remote, else the directory), which its MCP server applies to its working
  // directory too. It is also the start-up check: it fails where the manager cannot run.
  const checked = await manage(["group", root], { timeout: 10000 })
  const usable = checked.ok
  const group = process.env.MEMORY_GROUP_ID || checked.stdout.trim() || "opencode"
  if (!checked.ok) await log("error", `memory off: ${checked.why}`)
  else await log("info", `memory group ${group}`)
  const env = { ...process.env, MEMORY_GROUP_ID: group }
  const turns = new Map() // sessionID -> {asked, tools}
  const recalled = new Set()

  // Detached: the agent never waits on a store. Its one error line, if any, goes to the log.
  const store = (content, metadata) => {
    if (!usable) return
    try {
      const child = spawn(COMMAND[0], [...COMMAND.slice(1), "store", "-", JSON.stringify({ ...metadata, group })], {
        env, detached: true, stdio: ["pipe", "ignore", "pipe"],
      })
      let said = ""
      child.stderr.on("data", (chunk) => { said = (said + chunk).slice(-2000) })
      child.on("error", (error) => log("error", `memory store failed: ${COMMAND.join(" ")}: ${error.message}`))
      child.on("close", (code) => {
        if (code) log("error", `memory store failed (exit ${code}): ${said.trim().split("\n").pop() || "no message"}`)
      })
      child.stdin.on("error", () => {})
      child.stdin.end(content.slice(0, MAX_CONTENT))
      child.unref()
    } catch (error) {
      log("error", `memory store failed: ${error.message}`) // a memory must never cost the agent its turn
    }
  }

  const relative = (file) => (file && path.isAbsolute(file) ? path.relative(root, file) || file : file)
  const turn = (sessionID) => {
    if (!turns.has(sessionID)) turns.set(sessionID, { asked: "", tools: [] })
    return turns.get(sessionID)
  }

  // One deterministic block within a budget (`context`): the same memories and question give the
  // same bytes, so the provider's prompt cache keeps holding.
  const recall = async (question) => {
    if (!usable) return ""
    const answer = await manage(["context", "--budget-tokens", String(RECALL_BUDGET_TOKENS), "--",
      question.slice(0, 2000)], { env, timeout: RECALL_TIMEOUT_MS })
    if (!answer.ok) await log("warn", `memory recall skipped: ${answer.why}`)
    return answer.stdout.trim()
  }

  return {
    event: async ({ event }) => {
      try {
        const props = event.properties || {}
        if (event.type === "file.edited" && props.file) {
          store(`Edited ${relative(props.file)}`, { event: "file.edited", file: relative(props.file) })
        } else if (event.type === "session.error") {
          const error = props.error || {}
          const message = (error.data && error.data.message) || error.message || ""
          store(`Session error: ${error.name || "error"}: ${message}`.trim(), {
            event: "session.error", session: props.sessionID || null,
          })
        } else if (event.type === "session.idle" && props.sessionID) {
          const done = turns.get(props.sessionID)
          turns.delete(props.sessionID)
          if (done && done.asked) {
            const tools = done.tools.length ? ` Tools used: ${done.tools.join(", ")}.` : ""
            store(`Completed a turn. The user asked: ${done.asked}${tools}`, {
              event: "turn.completed", session: props.sessionID,
            })
          }
        }
      } catch {
        // never throw into OpenCode
      }
    },

    "chat.message": async (input, output) => {
      try {
        const text = (output.parts || []).filter((p) => p.type === "text" && !p.synthetic)
          .map((p) => p.text).join("\n").trim()
        if (text) turn(input.sessionID).asked = text.slice(0, 1000)
      } catch {}
    },

    "tool.execute.after": async (input) => {
      try {
        const args = input.args || {}
        const target = args.filePath || args.path || args.command || ""
        const described = target ? `${input.tool}(${relative(String(target)).slice(0, 120)})` : input.tool
        turn(input.sessionID).tools.push(described)
      } catch {}
    },

    "experimental.chat.system.transform": async (input, output) => {
      try {
        const sessionID = input.sessionID
        if (!RECALL || !sessionID || recalled.has(sessionID)) return
        recalled.add(sessionID)
        const asked = turns.has(sessionID) ? turns.get(sessionID).asked : ""
        if (!asked) return
        const memories = await recall(asked)
        if (memories && !memories.endsWith("No relevant memories found.")) {
          output.system.push(`Memories of this project from earlier sessions (events with their times, facts ` +
            `with their validity):\n${memories}`)
        }
      } catch {}
    },
  }
}
