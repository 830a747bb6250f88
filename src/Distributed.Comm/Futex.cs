using System.Runtime.InteropServices;

namespace Distributed.Comm;

/// <summary>
/// Linux futexes on a 32-bit word in memory shared between processes (a mapped file): a thread sleeps in the kernel
/// until another process changes the word and wakes it, within microseconds, with no polling in between. Shared
/// (non-private) operations, since waiter and waker live in different processes. Elsewhere <see cref="Supported"/>
/// is false and callers poll.
/// </summary>
static unsafe class Futex
{
    const int Wait = 0, Wake = 1;

    static readonly long SyscallNumber = RuntimeInformation.ProcessArchitecture switch
    {
        Architecture.X64 => 202,
        Architecture.Arm64 => 98,
        _ => -1,
    };

    public static bool Supported { get; } = OperatingSystem.IsLinux() && SyscallNumber > 0;

    [StructLayout(LayoutKind.Sequential)]
    struct Timespec { public long Seconds, Nanoseconds; }

    // libc's syscall(2) is variadic; on x86-64 and arm64 Linux integer arguments travel in the same registers either way.
    [DllImport("libc", EntryPoint = "syscall", SetLastError = true)]
    static extern long Syscall(long number, int* address, int operation, int value, Timespec* timeout, IntPtr address2, int value3);

    /// <summary>Sleeps while <c>*address == expected</c>, at most <paramref name="timeout"/> (or until woken, or a signal).</summary>
    public static void WaitWhile(int* address, int expected, TimeSpan timeout)
    {
        var span = new Timespec { Seconds = (long)timeout.TotalSeconds, Nanoseconds = timeout.Ticks % TimeSpan.TicksPerSecond * 100 };
        Syscall(SyscallNumber, address, Wait, expected, &span, IntPtr.Zero, 0);   // EAGAIN / ETIMEDOUT / EINTR: the caller re-checks
    }

    public static void WakeAll(int* address) => Syscall(SyscallNumber, address, Wake, int.MaxValue, null, IntPtr.Zero, 0);
}
