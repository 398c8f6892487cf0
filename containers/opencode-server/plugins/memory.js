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
// memories and two projects never share them), else the directory; MEMORY_GROUP_ID overrides.
//
// Environment: MEMORY_MANAGER (path of memory_manager.py), MEMORY_PYTHON (default python3),
// MEMORY_GROUP_ID, MEMORY_RECALL (on/off, default on), MEMORY_RECALL_TIMEOUT_MS (default 3000),
// plus the memory manager's own variables, which its processes inherit. No npm dependencies.

import { execFile, execFileSync, spawn } from "node:child_process"
import { createHash } from "node:crypto"
import path from "node:path"

const PYTHON = process.env.MEMORY_PYTHON || "python3"
const SCRIPT = process.env.MEMORY_MANAGER || "/opt/opencode/graphiti/memory_manager.py"
const RECALL = (process.env.MEMORY_RECALL || "on") !== "off"
const RECALL_TIMEOUT_MS = Number(process.env.MEMORY_RECALL_TIMEOUT_MS || 3000)
const MAX_CONTENT = 8000 // characters per stored event: a concise note, not a transcript

// "git@github.com:Acme/api.git", "https://user:pw@github.com/acme/api" -> "github.com/acme/api"
function normaliseRemote(url) {
  let text = url.trim().replace(/\.git\/?$/, "").replace(/\/+$/, "")
  const scp = text.match(/^(?:[^@/]+@)?([^:/]+):(?!\/)(.+)$/)
  if (scp) text = `${scp[1]}/${scp[2]}`
  text = text.replace(/^[a-z+]+:\/\//i, "").replace(/^[^@/]+@/, "").replace(/:\d+\//, "/")
  const [host, ...rest] = text.split("/")
  return [host.toLowerCase(), ...rest].join("/").toLowerCase()
}

// A group id the memory manager accepts: ^[A-Za-z0-9_-]{1,64}$
function groupId(identity) {
  const slug = identity.replace(/[^A-Za-z0-9]+/g, "-").replace(/^-+|-+$/g, "") || "project"
  if (slug.length <= 64) return slug
  const digest = createHash("sha256").update(identity).digest("hex").slice(0, 8)
  return `${slug.slice(0, 55)}-${digest}`
}

function projectGroup(directory) {
  if (process.env.MEMORY_GROUP_ID) return process.env.MEMORY_GROUP_ID
  try {
    const remote = execFileSync("git", ["-C", directory, "config", "--get", "remote.origin.url"], {
      encoding: "utf8", stdio: ["ignore", "pipe", "ignore"], timeout: 2000,
    })
    if (remote.trim()) return groupId(normaliseRemote(remote))
  } catch {
    // not a repository, or no origin: fall back to the directory
  }
  const resolved = path.resolve(directory)
  return groupId(`${path.basename(resolved)}-${createHash("sha256").update(resolved).digest("hex").slice(0, 8)}`)
}

// The plugin is the file's only export: OpenCode calls every exported function as a plugin.
export const MemoryPlugin = async ({ directory, worktree }) => {
  const root = worktree || directory
  const group = projectGroup(root)
  const env = { ...process.env, MEMORY_GROUP_ID: group }
  const turns = new Map() // sessionID -> {asked, tools}
  const recalled = new Set()

  const store = (content, metadata) => {
    try {
      const child = spawn(PYTHON, [SCRIPT, "store", "-", JSON.stringify({ ...metadata, group })], {
        env, detached: true, stdio: ["pipe", "ignore", "ignore"],
      })
      child.on("error", () => {})
      child.stdin.on("error", () => {})
      child.stdin.end(content.slice(0, MAX_CONTENT))
      child.unref()
    } catch {
      // a memory must never cost the agent its turn
    }
  }

  const relative = (file) => (file && path.isAbsolute(file) ? path.relative(root, file) || file : file)
  const turn = (sessionID) => {
    if (!turns.has(sessionID)) turns.set(sessionID, { asked: "", tools: [] })
    return turns.get(sessionID)
  }

  const recall = (question) => new Promise((resolve) => {
    execFile(PYTHON, [SCRIPT, "query", "--", question.slice(0, 2000), "5"], {
      env, timeout: RECALL_TIMEOUT_MS, encoding: "utf8",
    }, (error, stdout) => resolve(error ? "" : stdout.trim()))
  })

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
        if (memories && memories !== "No relevant memories found.") {
          output.system.push(`Memories of this project from earlier sessions (facts, newest validity first):\n${memories}`)
        }
      } catch {}
    },
  }
}
